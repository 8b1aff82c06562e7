"""`fastmix prepare` on the odd inputs of a real machine: FIFOs, symlink loops, unreadable,
binary and non-UTF-8 files, empty domains, a killed earlier run, a umask, a killed parent."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastmix.cli import main
from fastmix.data import DomainStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert "\n" not in message
    return message


@pytest.fixture
def texts(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("plain text, the kind prepare is for\n" * 20)
    return d


def test_a_fifo_is_skipped_with_a_warning_not_read(tmp_path, texts):
    os.mkfifo(texts / "pipe")  # reading it would block forever: nobody writes to it
    with pytest.warns(UserWarning, match="pipe: skipped, a FIFO is not a regular file"):
        main(["prepare", str(tmp_path / "s"), "--domain", f"web={texts}", "--quiet"])
    store = DomainStore(tmp_path / "s")
    assert store.meta["prepare"]["special_files_skipped"] == 1
    assert store.num_tokens("web") + store.num_tokens("web", "val") == 36 * 20 + 1


def test_a_fifo_given_as_the_domain_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    assert "pipe: not a regular file or directory (a FIFO)" in _error(
        ["prepare", str(tmp_path / "s"), "--domain", f"web={tmp_path / 'pipe'}", "--quiet"])


def test_a_symlink_loop_is_reported(tmp_path, texts):
    os.symlink(texts / "loop-b", texts / "loop-a")
    os.symlink(texts / "loop-a", texts / "loop-b")
    message = _error(["prepare", str(tmp_path / "s"), "--domain", f"web={texts}", "--quiet"])
    assert message == (f"fastmix prepare: error: {texts / 'loop-a'}: symlink loop (the link leads back to itself): "
                       "remove it or point it at a file")
    assert not os.path.exists(tmp_path / "s")


def test_an_unreadable_file_is_one_line_naming_it(tmp_path, texts):
    secret = texts / "secret.txt"
    secret.write_text("x")
    os.chmod(secret, 0)
    # root reads anything: the command then runs with root's capabilities dropped
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: nothing is unreadable")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--reuid=0"]
    result = subprocess.run([*prefix, sys.executable, "-m", "fastmix", "prepare", str(tmp_path / "s"), "--domain",
                             f"web={texts}", "--quiet"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"fastmix prepare: error: {secret}: cannot be read (Permission denied)"


def test_binary_files_are_skipped_and_counted(tmp_path, texts):
    shutil.copy(sys.executable, texts / "python-binary")
    with pytest.warns(UserWarning, match=r"skipped 1 binary file \(first: .*python-binary\)"):
        main(["prepare", str(tmp_path / "s"), "--domain", f"web={texts}", "--quiet"])
    store = DomainStore(tmp_path / "s")
    assert store.meta["prepare"]["binary_files_skipped"] == 1
    tokens = np.concatenate([store.tokens("web"), store.tokens("web", "val")])
    assert len(tokens) == 36 * 20 + 1  # the text file's bytes and its end-of-document token only


def test_non_utf8_text_is_counted_or_read_with_its_encoding(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème, déjà vu\n".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"replaced 4 characters that did not decode with U\+FFFD in 1 file "
                                         r"\(first: .*latin.txt; --encoding"):
        main(["prepare", str(tmp_path / "s"), "--domain", f"fr={latin}", "--quiet"])
    assert DomainStore(tmp_path / "s").meta["prepare"]["replaced_characters"] == 4
    main(["prepare", str(tmp_path / "s2"), "--domain", f"fr={latin}", "--encoding", "latin-1", "--quiet",
          "--val-fraction", "0"])
    store = DomainStore(tmp_path / "s2")
    assert store.load_tokenizer().decode(store.tokens("fr")) == "café crème, déjà vu\n"
    assert store.meta["prepare"] == {"encoding": "latin-1", "binary_files_skipped": 0, "special_files_skipped": 0,
                                     "replaced_characters": 0}
    assert "--encoding 'klingon' is not a text encoding" in _error(
        ["prepare", str(tmp_path / "s3"), "--domain", f"fr={latin}", "--encoding", "klingon"])


def test_an_empty_domain_is_refused_at_prepare_time(tmp_path, texts):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    message = _error(["prepare", str(tmp_path / "s"), "--domain", f"web={texts}", "--domain", f"code={empty}",
                      "--quiet"])
    assert message == f"fastmix prepare: error: domain 'code' ({empty}) holds no text: its files are empty " \
                      "(a domain needs tokens to train on)"
    assert set(os.listdir(tmp_path)) == {"texts", "empty.jsonl"}  # no store, no temporary


def test_a_domain_of_binary_files_only_is_refused(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(sys.executable, d / "python-binary")
    assert "domain 'exe': " in _error(["prepare", str(tmp_path / "s"), "--domain", f"exe={d}", "--quiet"])


def _big_jsonl(path, megabytes):
    line = json.dumps({"text": "a document of some length, " * 40}) + "\n"
    with open(path, "w") as f:
        f.write(line * (megabytes * (1 << 20) // len(line)))


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_prepare(tmp_path):
    """A `fastmix prepare` in its own process group (as a shell runs it) with its two workers busy."""
    big = tmp_path / "big.jsonl"
    _big_jsonl(big, 48)  # several chunks, so that the workers are busy when the parent is stopped
    out = tmp_path / "out" / "store"
    prepare = subprocess.Popen([sys.executable, "-m", "fastmix", "prepare", str(out), "--domain", f"web={big}",
                                "--workers", "2", "--quiet"], env={**os.environ, "PYTHONPATH": REPO},
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while len(_children(prepare.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(prepare.pid)
    assert len(workers) >= 2 and prepare.poll() is None
    return prepare, workers, out


def _wait_gone(workers):
    deadline = time.time() + 20
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    return not any(_alive(w) for w in workers)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux's /proc")
def test_a_killed_prepare_leaves_no_worker_and_its_temporary_goes_next_time(tmp_path, texts):
    prepare, workers, out = _start_prepare(tmp_path)
    os.kill(prepare.pid, signal.SIGKILL)
    prepare.wait()
    assert _wait_gone(workers)
    leftovers = [n for n in os.listdir(out.parent) if ".tmp-" in n]
    assert leftovers  # the killed run could not clean up
    main(["prepare", str(out.parent / "other"), "--domain", f"web={texts}", "--quiet"])
    assert os.listdir(out.parent) == ["other"]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux's /proc")
def test_ctrl_c_stops_prepare_and_its_workers_and_leaves_nothing(tmp_path):
    prepare, workers, out = _start_prepare(tmp_path)
    os.killpg(prepare.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, stderr = prepare.communicate(timeout=60)
    assert (prepare.returncode, stderr.strip()) == (130, "fastmix: interrupted")
    assert _wait_gone(workers)
    assert os.listdir(out.parent) == []


def test_a_live_prepares_temporary_is_left_alone(tmp_path, texts):
    from fastmix.data import StoreWriter

    with StoreWriter(tmp_path / "first", {"type": "byte", "vocab_size": 257}) as live:
        live.add("a", np.arange(50), np.arange(5))
        main(["prepare", str(tmp_path / "second"), "--domain", f"web={texts}", "--quiet"])
        assert os.path.isdir(live.tmp)
    assert DomainStore(tmp_path / "first").num_tokens("a") == 50


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_the_store_respects_the_umask(tmp_path, texts, umask):
    old = os.umask(umask)
    try:
        main(["prepare", str(tmp_path / "s"), "--domain", f"web={texts}", "--quiet"])
    finally:
        os.umask(old)
    for path in [tmp_path / "s", tmp_path / "s" / "tokens", tmp_path / "s" / "meta.json",
                 tmp_path / "s" / "tokens" / "web.train.bin"]:
        mode = os.stat(path).st_mode & 0o777
        full = 0o777 if os.path.isdir(path) else 0o666
        assert mode == full & ~umask, (path, oct(mode))
