#!/usr/bin/env python3
"""The workloads of bench/run.sh, one per call, on one directory.

    python3 bench/workloads.py WORKLOAD DIR [options]

prints one JSON object: {"workload": ..., "value": number, "unit": ...}.
The value is the wall-clock time in seconds of the workload (unit "s"),
or a rate for the big-file workloads (unit "MB/s", 10^6 bytes per second,
or "IOPS"). Setup and cleanup that are not part of what is measured are
done outside the timed section. A workload that fails exits non-zero with
the reason on stderr (run.sh records it as failed, it does not guess).

Workloads (SMALL is DIR/small, made by create, used by the next four):
    create    --files files of 100 bytes in a new SMALL (open, write, close)
    ls        one `ls -l SMALL` (output discarded)
    stat      os.lstat of each file in SMALL
    read      open, read, close of each file in SMALL
    rm        `rm -rf SMALL`
    extract   `tar -xf --tarball` into a new directory DIR/extract
    git       in a new directory DIR/gitrepo: `git init`, --git-files files
              written, `git add -A`, `git commit`, `git status`
    clean     removes DIR/extract and DIR/gitrepo (not a measurement: run.sh
              calls it after extract and git, once the system has settled)
    seqwrite  --size-mib MiB written in 1 MiB writes, then fsync; MB/s
    seqread   the file seqwrite left, read in 1 MiB reads after the kernel's
              page cache is dropped (needs root); MB/s; the file is removed
    fio       fio random 4 KiB reads (psync, 1 job) of a --fio-size-mib file
              for --fio-seconds seconds, the page cache dropped after fio
              laid the file out (needs root); IOPS (the file is removed)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def fail(msg):
    print(f"workloads.py: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd, **kw):
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    if r.returncode != 0:
        fail(f"{' '.join(cmd)} exited with {r.returncode}: {r.stderr.decode(errors='replace').strip()[:500]}")


def names(n):
    return [f"f{i:05d}" for i in range(n)]


def w_create(a):
    small = os.path.join(a.dir, "small")
    data = b"k" * 100
    t0 = time.monotonic()
    os.mkdir(small)
    for name in names(a.files):
        with open(os.path.join(small, name), "wb") as f:
            f.write(data)
    return time.monotonic() - t0, "s"


def w_ls(a):
    small = os.path.join(a.dir, "small")
    t0 = time.monotonic()
    r = subprocess.run(["ls", "-l", small], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t = time.monotonic() - t0
    if r.returncode != 0:
        fail(f"ls -l {small}: {r.stderr.decode(errors='replace').strip()}")
    listed = r.stdout.count(b"\n") - 1  # the "total" line
    if listed != a.files:
        fail(f"ls -l {small} listed {listed} entries, expected {a.files}")
    return t, "s"


def w_stat(a):
    small = os.path.join(a.dir, "small")
    paths = [os.path.join(small, n) for n in names(a.files)]
    t0 = time.monotonic()
    for p in paths:
        st = os.lstat(p)
        if st.st_size != 100:
            fail(f"{p} has {st.st_size} bytes, expected 100")
    return time.monotonic() - t0, "s"


def w_read(a):
    small = os.path.join(a.dir, "small")
    paths = [os.path.join(small, n) for n in names(a.files)]
    t0 = time.monotonic()
    for p in paths:
        with open(p, "rb") as f:
            if len(f.read()) != 100:
                fail(f"{p} did not read 100 bytes")
    return time.monotonic() - t0, "s"


def w_rm(a):
    small = os.path.join(a.dir, "small")
    t0 = time.monotonic()
    run(["rm", "-rf", small])
    t = time.monotonic() - t0
    if os.path.exists(small):
        fail(f"{small} is still there after rm -rf")
    return t, "s"


def w_extract(a):
    if not a.tarball:
        fail("extract needs --tarball")
    dst = os.path.join(a.dir, "extract")
    os.mkdir(dst)
    t0 = time.monotonic()
    run(["tar", "-xf", a.tarball, "-C", dst])
    return time.monotonic() - t0, "s"


def w_git(a):
    repo = os.path.join(a.dir, "gitrepo")
    env = dict(os.environ)
    # No user's or system's git configuration is read; identity is fixed.
    env.update(
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@example.invalid",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@example.invalid",
        GIT_AUTHOR_DATE="2000-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2000-01-01T00:00:00Z",
    )
    t0 = time.monotonic()
    os.mkdir(repo)
    run(["git", "init", "-q", "-b", "main", repo], env=env)
    for i in range(a.git_files):
        sub = os.path.join(repo, f"d{i % 10}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"file{i:03d}.txt"), "w") as f:
            f.write(f"line {i}\n" * (1 + i % 20))
    run(["git", "-C", repo, "add", "-A"], env=env)
    run(["git", "-C", repo, "commit", "-q", "-m", "bench"], env=env)
    r = subprocess.run(["git", "-C", repo, "status", "--porcelain"], env=env, capture_output=True)
    t = time.monotonic() - t0
    if r.returncode != 0 or r.stdout.strip():
        fail(f"git status after the commit: exit {r.returncode}, output {r.stdout[:200]!r} {r.stderr[:300]!r}")
    return t, "s"


def w_clean(a):
    for d in ("extract", "gitrepo"):
        shutil.rmtree(os.path.join(a.dir, d), ignore_errors=True)
    return 0.0, "s"


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def big_path(a):
    return os.path.join(a.dir, "big.bin")


def w_seqwrite(a):
    p = big_path(a)
    block = os.urandom(1 << 20)
    t0 = time.monotonic()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(a.size_mib):
            if os.write(fd, block) != len(block):
                fail(f"short write to {p}")
        os.fsync(fd)
    finally:
        os.close(fd)
    t = time.monotonic() - t0
    return a.size_mib * (1 << 20) / t / 1e6, "MB/s"


def w_seqread(a):
    p = big_path(a)
    want = a.size_mib * (1 << 20)
    drop_caches()
    got = 0
    t0 = time.monotonic()
    fd = os.open(p, os.O_RDONLY)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            got += len(b)
    finally:
        os.close(fd)
    t = time.monotonic() - t0
    os.unlink(p)
    if got != want:
        fail(f"read {got} bytes of {p}, expected {want}")
    return got / t / 1e6, "MB/s"


def w_fio(a):
    p = os.path.join(a.dir, "fio.dat")
    job = [
        "fio", "--name=randread", f"--filename={p}", "--rw=randread", "--bs=4k",
        f"--size={a.fio_size_mib}M", "--ioengine=psync", "--numjobs=1",
    ]
    # Lay the file out first, then drop the page cache: every system starts
    # cold. (fio's own --invalidate asks the file system to drop the file's
    # cache, which a FUSE passthrough mount does not pass on to its backing
    # file, so the systems would start with different caches.)
    run(job + ["--create_only=1"])
    drop_caches()
    r = subprocess.run(job + ["--time_based", f"--runtime={a.fio_seconds}", "--output-format=json"],
                       capture_output=True)
    if os.path.exists(p):
        os.unlink(p)
    if r.returncode != 0:
        fail(f"fio exited with {r.returncode}: {r.stderr.decode(errors='replace').strip()[:500]}")
    out = r.stdout.decode(errors="replace")
    # fio may print notes before the JSON object.
    try:
        report = json.loads(out[out.index("{"):])
        iops = report["jobs"][0]["read"]["iops"]
    except (ValueError, KeyError, IndexError) as e:
        fail(f"cannot read fio's JSON ({e}): {out[:300]}")
    if iops <= 0:
        fail("fio read nothing")
    return iops, "IOPS"


WORKLOADS = {
    "create": w_create, "ls": w_ls, "stat": w_stat, "read": w_read, "rm": w_rm,
    "extract": w_extract, "git": w_git, "seqwrite": w_seqwrite, "seqread": w_seqread,
    "fio": w_fio, "clean": w_clean,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("dir")
    p.add_argument("--files", type=int, default=10000)
    p.add_argument("--tarball")
    p.add_argument("--git-files", type=int, default=200)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--fio-size-mib", type=int, default=256)
    p.add_argument("--fio-seconds", type=int, default=10)
    a = p.parse_args()
    value, unit = WORKLOADS[a.workload](a)
    print(json.dumps({"workload": a.workload, "value": value, "unit": unit}))


if __name__ == "__main__":
    main()
