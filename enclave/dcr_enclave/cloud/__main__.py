"""``python -m dcr_enclave.cloud``: the enclave image's entry point (see :mod:`dcr_enclave.cloud.run`).

The supervisor's tmpfs must exist only in its own mount namespace, so that it disappears with the
supervisor's last process and nothing else in the container sees it mount: the first invocation re-executes
itself under ``unshare --mount --propagation private`` (as the local enclave host launches its supervisor),
marked by an argument the launcher cannot change (the image does not allow a command override).
"""

from __future__ import annotations

import os
import sys

IN_NAMESPACE = "--in-private-mount-namespace"


def main() -> int:
    if sys.argv[1:] != [IN_NAMESPACE]:
        argv = ["unshare", "--mount", "--propagation", "private", "--"]
        argv += [sys.executable, "-m", "dcr_enclave.cloud", IN_NAMESPACE]
        try:
            os.execvp(argv[0], argv)  # noqa: S606 (a fixed argument list, no shell)
        except OSError as e:
            print(f"dcr enclave: cannot enter a private mount namespace: {e.strerror}", file=sys.stderr)
            return 1
    from dcr_enclave.cloud.run import main as run_main

    return run_main()


if __name__ == "__main__":
    raise SystemExit(main())
