"""The run directory's guarantees, met the way they fail on a user's machine: a real second
process on the lock, a real SIGKILL, real corrupted bytes, a real full file system (a tiny tmpfs
in a user namespace), a real permission refusal."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastmix import rundir
from fastmix.rundir import (CheckpointError, MetricsError, RunLock, RunLockedError, RunWriteError, load_checkpoint,
                            read_metrics, save_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code, **kwargs):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120, **kwargs)


def state(step=1):
    return {"step": step, "model": {"w": torch.randn(64, 64), "b": torch.randn(64)},
            "rng": {"python": (3, tuple(range(5)), None)}, "config": {"lr": 0.1}}


# ---------------------------------------------------------------- one writer

def test_a_second_process_is_refused_naming_the_holders_pid(tmp_path):
    with RunLock(str(tmp_path)):
        result = python(f"""
            from fastmix.rundir import RunLock
            RunLock({str(tmp_path)!r}).acquire()
        """)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"is in use by another fastmix train (PID {os.getpid()}" in last


def test_a_lock_of_a_killed_process_is_no_obstacle(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fastmix.rundir import RunLock\n"
                               f"RunLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
        RunLock(str(tmp_path)).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert os.path.exists(tmp_path / "run.lock")  # the stale file stays: only the kernel's lock mattered
    with RunLock(str(tmp_path)):
        assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())


def test_the_lock_is_released_on_an_error(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunLock(str(tmp_path)):
            1 / 0
    RunLock(str(tmp_path)).acquire().release()


# ---------------------------------------------------------------- checkpoints

def test_a_checkpoint_round_trips_and_keeps_the_previous_one(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    first, second = state(1), state(2)
    save_checkpoint(path, first)
    save_checkpoint(path, second)
    assert torch.equal(load_checkpoint(path)["model"]["w"], second["model"]["w"])
    assert torch.equal(load_checkpoint(str(tmp_path / "ckpt.prev.pt"))["model"]["w"], first["model"]["w"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt.prev.pt", "ckpt.pt"]


def _flip_inside_tensor(path, tensor, count=2000):
    """Flips `count` bytes inside the stored bytes of `tensor` (found in the file), as a failing
    disk would: the zip structure stays valid and torch loads the file without complaint."""
    data = bytearray(open(path, "rb").read())
    raw = tensor.numpy().tobytes()
    start = data.find(raw[:64])
    assert start >= 0
    for i in range(start + 100, start + 100 + count):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "bit-flipped"])
def test_a_damaged_checkpoint_names_the_file_and_the_last_good_one(tmp_path, damage):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, state(5))
    latest = state(10)
    save_checkpoint(path, latest)
    size = os.path.getsize(path)
    if damage == "truncated":
        os.truncate(path, size // 2)
    elif damage == "empty":
        os.truncate(path, 0)
    elif damage == "text":
        open(path, "w").write("not a checkpoint\n")
    else:
        _flip_inside_tensor(path, latest["model"]["w"])
        torch.load(path, weights_only=False)  # loads silently: only the checksum can tell
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert f"the last good one is {tmp_path / 'ckpt.prev.pt'} (step 5)" in message
    if damage == "bit-flipped":
        assert "do not match its checksum" in message


def test_a_damaged_checkpoint_without_an_earlier_one_says_so(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, state(3))
    os.truncate(path, 100)
    with pytest.raises(CheckpointError, match="there is no earlier checkpoint"):
        load_checkpoint(path)


def test_the_checksum_covers_bfloat16_and_0_dim_tensors(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    x = torch.randn(3).to(torch.bfloat16)
    save_checkpoint(path, {"step": 1, "x": x, "n": torch.tensor(2.0)})
    assert torch.equal(load_checkpoint(path)["x"], x)


# ---------------------------------------------------------------- metrics

def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match=f"{path}:3: dropped a torn last line"):
        assert [r["step"] for r in read_metrics(str(path))] == [0, 1]


def test_a_corrupt_line_before_the_last_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(MetricsError, match=f"^{path}:2: corrupt metrics record"):
        read_metrics(str(path))


# ---------------------------------------------------------------- write errors

def _can_mount_tmpfs():
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                          capture_output=True).returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")


@needs_tmpfs
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    """A real ENOSPC: a 512 KiB tmpfs holds the first checkpoint (~70 KiB) but not a 2 MiB one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    code = textwrap.dedent(f"""
        import os, torch
        from fastmix.rundir import save_checkpoint, load_checkpoint, RunWriteError
        path = {str(mount / 'ckpt.pt')!r}
        small = {{"step": 4, "w": torch.randn(64, 64)}}
        save_checkpoint(path, small)
        try:
            save_checkpoint(path, {{"step": 8, "w": torch.randn(512, 1024)}})
        except RunWriteError as e:
            print("ERROR", e)
        assert torch.equal(load_checkpoint(path)["w"], small["w"])
        print("FILES", sorted(os.listdir({str(mount)!r})))
    """)
    script = tmp_path / "fill.py"
    script.write_text(code)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=512k tmpfs {mount} && "
                             f"{sys.executable} {script}"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert result.returncode == 0, result.stderr
    error = next(line for line in result.stdout.splitlines() if line.startswith("ERROR"))
    assert f"could not write {mount / 'ckpt.pt'}: No space left on device" in error
    assert "(step 4) is intact" in error and "Free some space, then continue with --resume" in error
    assert "FILES ['ckpt.pt']" in result.stdout  # no temporary file left to fill the disk


def test_a_refused_write_says_what_is_intact(tmp_path):
    """A real EACCES: a read-only file, written by a process without the power to override it
    (root's capabilities dropped with setpriv where the tests run as root)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    os.chmod(path, 0o444)
    code = f"""
from fastmix.rundir import writing
with writing({str(path)!r}, "The checkpoint is intact", "continue with --resume"):
    open({str(path)!r}, "a").write("x")
"""
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: nothing would refuse the write")
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--reuid=0", *command]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
                            timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"could not write {path}: Permission denied. The checkpoint is intact. Make it writable, then " \
           "continue with --resume" in last


def test_digest_walks_every_value():
    a = {"step": 1, "x": [torch.ones(2), (1, "a")], "r": __import__("numpy").arange(3)}
    b = {"step": 1, "x": [torch.ones(2), (1, "b")], "r": __import__("numpy").arange(3)}
    assert rundir.state_digest(a) != rundir.state_digest(b)
    assert rundir.state_digest(a) == rundir.state_digest({**a, "checksum": "ignored"})
