"""Run a script as __main__ once per argv in this one process (see conftest.run_isolated_script).

Usage: python script_runs.py SCRIPT RUNS_JSON RESULTS_JSON, RUNS_JSON holding a list of argvs. Each run's stdout and
stderr go to files of its own at the file-descriptor level (as a pipe per process would take them: C code and
handlers bound in an earlier run write there too); RESULTS_JSON gets [status, stdout, stderr] per run.
"""

import json
import os
import runpy
import sys
import tempfile


def exit_status(code: object) -> int:
    """The status the interpreter exits with for `SystemExit(code)` (it prints a code that is not an int)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code % 256
    print(code, file=sys.stderr)
    return 1


def run(script: str, argv: list[str]) -> int:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        return exit_status(stop.code)
    except Exception:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def main() -> None:
    script, runs, results = sys.argv[1:]
    progress = os.fdopen(os.dup(2), "w")  # the process's own stderr: which run is in progress, if one hangs
    stdout, stderr = sys.stdout, sys.stderr
    outcomes = []
    for argv in json.loads(open(runs).read()):
        print(f"run: {argv}", file=progress, flush=True)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            stdout.flush(), stderr.flush()
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            sys.stdout, sys.stderr = stdout, stderr  # as the run starts, whatever the last one left
            status = run(script, argv)
            sys.stdout.flush(), sys.stderr.flush()
            outcomes.append([status, *(os.pread(f.fileno(), os.fstat(f.fileno()).st_size, 0).decode(errors="replace")
                                       for f in (out, err))])
    with open(results, "w") as f:
        json.dump(outcomes, f)


if __name__ == "__main__":
    main()
