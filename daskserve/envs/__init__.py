"""Packed environments: backends whose dependencies differ from the workers'.

- ``pack``: ``PackedEnv`` on the client, packing cached by content hash;
- ``spec``: what travels about an env (its identity, never its bytes);
- ``probe``: does an env's interpreter run here, with matching versions;
- ``cache``: the per-host cache of unpacked envs (lock, atomic install, removal);
- ``host``: the replica host that runs a replica in a child process of the worker;
- ``child``: that process's main;
- ``scheduler_plugin.envs``: archives held in the cluster and the backends using them.
"""
from .pack import PackedEnv
from .spec import EnvError

__all__ = ["EnvError", "PackedEnv"]
