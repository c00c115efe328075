"""Benchmark: dataset decryption (:func:`dcr_enclave.formats.streamcrypt.decrypt_file`) against a plain copy.

A 1 GiB random file is encrypted once (default 1 MiB chunks) into a temporary directory, which is deleted
afterwards. Then, alternately and ``--repeat`` times each, the script times:

* ``decrypt_file`` as the enclave calls it: header check, AES-256-GCM per chunk, write to a temporary
  file, rename; and again with the plaintext's sha256 computed (``digest=True``, for version checks);
* the baseline: a plain read + write copy of the same ciphertext bytes with a buffer of the same size
  (no cryptography, no hashing).

It prints the best throughput of each in GB/s of plaintext (10^9 bytes per second), their ratio and the
process's peak resident memory. Everything runs in this one thread, so the figure is per core; the budget
in the architecture is at least 1 GB/s per core with memory flat in file size. Both run warm (the
ciphertext is in the page cache after encryption), and the CPU time is printed beside the wall-clock time
to show one core did the work. By default (as root) the files go to a tmpfs mounted exactly as the
enclave supervisor mounts its private scratch (:func:`dcr_enclave.runtime.supervisor.mount_scratch`,
``huge=within_size``), which is where the enclave decrypts; ``--dir`` picks another file system (for
example ``/dev/shm``, a plain tmpfs, for comparison). Run from the repository root::

    .venv/bin/python benchmarks/bench_decrypt.py [--dir /dev/shm] [--size-mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dcr_enclave.formats.streamcrypt import (
    DEFAULT_CHUNK_SIZE,
    TAG_SIZE,
    FileContext,
    decrypt_file,
    encrypt_file,
)
from dcr_enclave.runtime.supervisor import mount_scratch

CTX = FileContext("bench", "random", "sha256:" + "0" * 64, "data.bin")


def make_plaintext(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def plain_copy(src: Path, dest: Path) -> None:
    """The baseline: read and write the same bytes through a buffer of the size decryption uses."""
    buf = memoryview(bytearray(DEFAULT_CHUNK_SIZE + TAG_SIZE))
    with open(src, "rb", buffering=0) as fin, open(dest, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            fout.write(buf[:n])


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[float, float]:
    """Wall-clock and CPU seconds (user + system of this process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the temporary files go (default: a tmpfs mounted like the enclave's scratch)",
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="plaintext size in MiB (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (best is reported)")
    args = parser.parse_args()
    size = args.size_mib << 20
    key = os.urandom(32)
    with contextlib.ExitStack() as stack:
        base = args.dir
        if base is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dcr-bench-mnt-")))
            mount_scratch(base, 3 * size + (64 << 20))
            stack.callback(subprocess.run, ["umount", str(base)], check=True)
        _run(args, size, key, base)


def _run(args: argparse.Namespace, size: int, key: bytes, base: Path) -> None:
    with tempfile.TemporaryDirectory(dir=base, prefix="dcr-bench-decrypt-") as tmp:
        d = Path(tmp)
        make_plaintext(d / "plain", size)
        start = time.perf_counter()
        encrypt_file(d / "plain", d / "cipher", key, CTX)
        encrypt_s = time.perf_counter() - start
        (d / "plain").unlink()
        decrypt_s, hashed_s, copy_s = [], [], []
        for _ in range(args.repeat):
            copy_s.append(timed(plain_copy, d / "cipher", d / "copy"))
            (d / "copy").unlink()
            decrypt_s.append(timed(decrypt_file, d / "cipher", d / "out", key, CTX, digest=False))
            (d / "out").unlink()
            hashed_s.append(timed(decrypt_file, d / "cipher", d / "out", key, CTX))
            (d / "out").unlink()
        where = os.path.dirname(tmp) + (" (tmpfs as the enclave mounts it)" if args.dir is None else "")
    gbps = lambda s: size / s / 1e9  # noqa: E731
    (best_decrypt, decrypt_cpu), (best_copy, copy_cpu) = min(decrypt_s), min(copy_s)
    best_hashed, hashed_cpu = min(hashed_s)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"file: {args.size_mib} MiB in {where}, chunk size {DEFAULT_CHUNK_SIZE} bytes, best of {args.repeat}"
    )
    print(f"encrypt (once)          {gbps(encrypt_s):6.2f} GB/s")
    print(
        f"decrypt_file            {gbps(best_decrypt):6.2f} GB/s  ({best_decrypt:.3f} s, cpu {decrypt_cpu:.3f} s)"
    )
    print(
        f"  + plaintext sha256    {gbps(best_hashed):6.2f} GB/s  ({best_hashed:.3f} s, cpu {hashed_cpu:.3f} s)"
    )
    print(f"baseline read+write     {gbps(best_copy):6.2f} GB/s  ({best_copy:.3f} s, cpu {copy_cpu:.3f} s)")
    print(f"decrypt / baseline time {best_decrypt / best_copy:6.2f}x")
    print(f"peak RSS                {rss_mib:6.1f} MiB")


if __name__ == "__main__":
    main()
