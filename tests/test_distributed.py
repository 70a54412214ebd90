"""decompose under torchrun: 2 gloo processes on CPU against 1, and failing ranks."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest

from pissa_svd import decompose
from pissa_svd.distributed import assign

from .conftest import PYTHON, save_tiny_llama


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    # Wider than the shared fixture so that the 2 ranks get several batches each.
    return save_tiny_llama(tmp_path_factory.mktemp("dist") / "ckpt", num_hidden_layers=4)


def torchrun(args: list, tmp_path: Path, fault: str = "") -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` of the CLI; ``fault`` is Python run in rank 1 first."""
    entry = tmp_path / "entry.py"
    entry.write_text(
        "import os, sys\n"
        'if os.environ["RANK"] == "1":\n'
        "    from pissa_svd import pipeline\n"
        + textwrap.indent(textwrap.dedent(fault) or "pass\n", "    ")
        + "from pissa_svd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, str(entry), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix == ".safetensors" or p.name.endswith("index.json")
    }


def test_two_processes_write_the_same_bytes_as_one(src, tmp_path):
    one = tmp_path / "one"
    decompose(src, one, rank=8, niter=4, quiet=True)
    two = tmp_path / "two"
    proc = torchrun(["decompose", src, "--rank", 8, "--out", two], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(two) == files(one) and len(files(one)) >= 5
    assert proc.stdout.count("matrices decomposed") == 1  # rank 0 speaks for the run
    import json

    report = json.loads((two / "pissa_report.json").read_text())
    assert report["totals"]["processes"] == 2 and report["totals"]["matrices"] == 28
    assert [r["name"] for r in report["matrices"]] == [
        r["name"] for r in json.loads((one / "pissa_report.json").read_text())["matrices"]
    ]


def test_a_failing_rank_fails_every_rank_and_leaves_no_out(src, tmp_path):
    fault = textwrap.dedent(
        """
        real = pipeline._decompose_batch
        def broken(plan, batch, *args):
            if any("layers.2" in t.name for t in batch):
                raise RuntimeError("injected fault")
            return real(plan, batch, *args)
        pipeline._decompose_batch = broken
        """
    )
    out = tmp_path / "out"
    proc = torchrun(["decompose", src, "--rank", 8, "--out", out, "--quiet"], tmp_path, fault)
    assert proc.returncode != 0
    # Both ranks name the failing rank and tensor.
    # Both ranks print it (two processes share stderr, so the lines may run together).
    said = re.findall(
        r"pissa-svd: error: rank 1 failed on model\.layers\.[^:]*: RuntimeError: "
        r"injected fault",
        proc.stderr,
    )
    assert len(said) == 2, proc.stderr[-3000:]
    assert not out.exists()


def test_a_killed_rank_leaves_no_out_and_the_run_resumes(src, tmp_path):
    fault = textwrap.dedent(
        """
        import signal
        real = pipeline._decompose_batch
        def dying(plan, batch, *args):
            if any("layers.1" in t.name for t in batch):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(plan, batch, *args)
        pipeline._decompose_batch = dying
        """
    )
    out = tmp_path / "out"
    proc = torchrun(["decompose", src, "--rank", 8, "--out", out, "--quiet"], tmp_path, fault)
    assert proc.returncode != 0
    # Rank 0 either notices first (its collective fails) or is stopped by torchrun first.
    noticed = "rank 0 lost contact with another process" in proc.stderr
    assert noticed or "pissa-svd: interrupted" in proc.stderr, proc.stderr[-3000:]
    assert "local_rank: 1" in proc.stderr  # torchrun's summary names the rank that died
    assert not out.exists()

    # Rank 0's finished tensors were kept; a resumed 2-process run gives a 1-process run's bytes,
    # with a staged shard that lost its size, and a copied tensor changed in place.
    staging = tmp_path / ".out.partial"
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    os.truncate(staging / weight_map["lm_head.weight"], 1000)
    with open(staging / weight_map["model.embed_tokens.weight"], "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin = json.loads(f.read(n))["model.embed_tokens.weight"]["data_offsets"][0]
        f.seek(8 + n + begin)
        f.write(b"\x07" * 64)
    proc = torchrun(["decompose", src, "--rank", 8, "--out", out, "--resume", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    decompose(src, one, rank=8, niter=4, quiet=True)
    assert files(out) == files(one)


def test_a_rank_lost_after_out_was_written_says_so(src, tmp_path):
    """Rank 1 dies once rank 0 has renamed OUT into place: OUT is complete, and rank 0 must not
    say that it was not written (it may also finish before it notices)."""
    out = tmp_path / "out"
    fault = textwrap.dedent(
        f"""
        import time
        real, calls = pipeline._from_leader, []
        def leaving(team):
            calls.append(1)
            if len(calls) == 2:  # the final word, sent after the rename
                deadline = time.time() + 120
                while not os.path.exists({str(out / "pissa_report.json")!r}) and time.time() < deadline:
                    time.sleep(0.05)
                os._exit(1)
            return real(team)
        pipeline._from_leader = leaving
        """
    )
    proc = torchrun(["decompose", src, "--rank", 8, "--out", out, "--quiet"], tmp_path, fault)
    assert proc.returncode != 0 and "OUT was not written" not in proc.stderr, proc.stderr[-3000:]
    one = tmp_path / "one"
    decompose(src, one, rank=8, niter=4, quiet=True)
    assert files(out) == files(one)


def test_sigterm_stops_a_process_waiting_for_its_peers(src, tmp_path):
    """Blocked in the rendezvous (or a collective) for a peer that never comes, a process
    still ends on SIGTERM (kill, a scheduler's timeout) instead of waiting for gloo's
    30-minute timeout: a Python handler would not run until the C++ call returned."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    cmd = [PYTHON, "-m", "pissa_svd", "decompose", str(src), "--rank", "4"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "out"), "--quiet"], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # rank 0 serves the rendezvous store once it waits
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, "the process ended before its rendezvous"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "out").exists()


def test_assign_balances_deterministically():
    costs = [5.0, 1.0, 4.0, 3.0, 3.0, 2.0]
    owner = assign(costs, 2)
    assert owner == assign(list(costs), 2)
    loads = [sum(c for c, r in zip(costs, owner, strict=True) if r == k) for k in range(2)]
    assert sorted(loads) == [9.0, 9.0]
    assert assign(costs, 1) == [0] * 6
    assert sorted(set(assign([1.0] * 4, 4))) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"WORLD_SIZE": "2"}, "each process needs a RANK from 0 to 1"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "each process needs a RANK from 0 to 1"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR is not set"),
    ],
)
def test_a_broken_distributed_environment_is_bad_input(
    src, tmp_path, run_cli, monkeypatch, env, says
):
    """Processes started by hand with half of torchrun's variables: one line and exit 2 before
    any work, not a traceback from the rendezvous (or a wait for a peer that never comes)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", src, "--rank", "4", "--out", out, "--quiet")
    assert code == 2 and says in err and err.count("\n") == 1, err
    assert not out.exists()
