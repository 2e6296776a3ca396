"""The README's code runs as printed (on a free port) and prints what it claims."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_example(tmp_path):
    text = README.read_text()
    code = re.search(r"## In 20 lines\s+```python\n(.*?)```", text, re.S).group(1)
    port = free_port()
    code = code.replace("8000", str(port)).replace(
        "client = serve.start(Client(LocalCluster(n_workers=2, threads_per_worker=1)))",
        "client = serve.start(Client(LocalCluster(n_workers=2, threads_per_worker=1, "
        f"dashboard_address=':0')), http_options={{'port': {port}}})")
    script = tmp_path / "readme_example.py"
    script.write_text("if __name__ == '__main__':\n" +
                      "".join(f"    {line}\n" for line in code.splitlines()) +
                      "    client.shutdown()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[:2] == ["{'y': 3.0}", "3.0"]
