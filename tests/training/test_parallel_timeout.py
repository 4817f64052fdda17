"""A rank that waits too long at a barrier stops with an error naming what it waited for, and a rank that is killed
stops the run (torchrun names it) instead of leaving the other waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import torchrun_pretrain_cmd  # noqa: E402


def _torchrun(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_barrier_times_out_naming_what_it_waits_for(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from imglish.training import parallel

        info = parallel.init_distributed("gloo", timeout_s=60)
        parallel.barrier("everyone to start")  # passes: both ranks arrive
        if info.rank == 0:
            time.sleep(60)  # rank 0 'trains a tokenizer' for far longer than rank 1 will wait
        try:
            parallel.barrier("rank 0 to train the text tokenizer", timeout_s=3)
        except parallel.DistributedTimeout as err:
            print(f"RANK{info.rank}: {err}", flush=True)
            sys.exit(3)
        print(f"RANK{info.rank}: passed", flush=True)
    """))
    done = _torchrun(script)
    assert done.returncode != 0
    line = next(x for x in done.stdout.splitlines() if x.startswith("RANK1: "))
    assert "rank 1 of 2 stopped waiting for rank 0 to train the text tokenizer after 3 s (limit 3 s)" in line
    assert "RANK1: passed" not in done.stdout
    assert "RANK0" not in done.stdout  # rank 1's exit ended the run: torchrun stopped rank 0 in its sleep


def test_barrier_passes_when_everyone_arrives(tmp_path):
    script = tmp_path / "ok.py"
    script.write_text(textwrap.dedent("""
        import time
        from imglish.training import parallel

        info = parallel.init_distributed("gloo", timeout_s=60)
        if info.rank == 0:
            time.sleep(1)
        parallel.barrier("rank 0", timeout_s=30)
        print(f"RANK{info.rank}: passed", flush=True)
    """))
    done = _torchrun(script)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RANK0: passed" in done.stdout and "RANK1: passed" in done.stdout


def _worker_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun (``parent``) started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        rank = [v.split(b"=", 1)[1] for v in env if v.startswith(b"RANK=")]
        if ppid == parent and rank:
            found[int(rank[0])] = int(entry.name)
    return found


def test_a_killed_rank_stops_the_run_and_resume_continues(tmp_path):
    import json
    import signal

    import pytest

    from imglish.data.synthetic import WorldConfig, generate_world

    if not Path("/proc/self/environ").exists():
        pytest.skip("finding the worker processes needs /proc")
    world = tmp_path / "world"
    generate_world(WorldConfig(num_images=40, seed=2, workers=1, formats=("coco", "imagenet", "text")), world)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = torchrun_pretrain_cmd(world, run, 40, **{"--save-every": "3", "--parallel.timeout_s": "30"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((run / "checkpoints").glob("step-*.pt")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
        assert set(workers) == {0, 1}
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert stopped_after < 60  # the survivor did not wait for the lost rank
    assert "rank      : 1" in err or "rank: 1" in err, err[-3000:]
    assert "SIGKILL" in err
    assert not (run / "model.safetensors").exists()
    saved = max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pt"))
    assert 3 <= saved < 40

    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"(step {saved})" in done.stdout and "resumed from" in done.stdout
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 40 and len(steps) == len(set(steps))
    assert (run / "model.safetensors").is_file()
