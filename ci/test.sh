#!/usr/bin/env bash
# What CI runs, for developers: a fresh virtualenv in .venv and the whole suite.
exec bash "$(dirname "$0")/../.ci/run"
