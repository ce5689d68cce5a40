"""A process that imports fedsim once, then runs each ``fedsim`` command of the bad-inputs
table in a child forked from it (``python -m tests.zygote``; one JSON request per
line on stdin, one JSON answer per line on stdout).

A child is what ``python -m fedsim <args>`` would be, less the seconds of importing torch,
Flower, Hydra and fedsim: its working directory, environment and ``sys.path[0]`` are the
command's, its stdout and stderr are files (file descriptors 1 and 2, so whatever any library
writes is caught), an exception that escapes ``main`` prints its traceback and exits 1 as the
interpreter would, and ``SystemExit`` gives the exit status. The zygote runs nothing else
(no thread, no tensor operation), so forking it is safe.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
import traceback

import flwr  # noqa: F401  (imported here so that each child does not)
import torch  # noqa: F401

import fedsim.api  # noqa: F401
import fedsim.apps  # noqa: F401
import fedsim.build  # noqa: F401
import fedsim.engines  # noqa: F401
from fedsim.cli import main


def _child(request: dict) -> None:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:1] = [request["cwd"], *extra]  # as `python -m` (and PYTHONPATH) would set it
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = ["fedsim", *request["args"]]
    code = 0
    try:
        main(request["args"])
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # what the interpreter runs at exit (logging's flush included)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _wait(pid: int, timeout: float) -> int:
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() - t0 > timeout:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.02)


def serve() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        rc = _wait(pid, request.get("timeout", 300))
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    serve()
