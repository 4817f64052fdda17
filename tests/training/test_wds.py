"""Webdataset streaming for pretraining: shards split by rank and by DataLoader worker, exact resume with the same
process and worker counts, and a run of the real tiny model on the world's shards."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import tiny_pretrain_args  # noqa: E402

from imglish.cli.main import main as cli_main
from imglish.training.config import build_config
from imglish.training.pretrain import wds_streams
from imglish.training.streams import WdsStepBatches, make_step_loader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from imglish.data.synthetic import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("wdsworld") / "w"
    generate_world(
        WorldConfig(
            num_images=50,
            image_size=32,
            seed=4,
            shard_size=5,
            texts_per_image=2,
            formats=("coco", "imagenet", "text", "wds"),
            workers=1,
        ),
        out,
    )
    return out


class KeyMaker:
    """A sample maker that keeps only a checksum of each record's key (to see which records were read)."""

    def __call__(self, stream: str, record: dict, seed: int) -> dict[str, torch.Tensor]:
        return {
            "key": torch.tensor(zlib.crc32(f"{stream}:{record['key']}".encode())),
            "seed": torch.tensor(seed % 1_000_003),
        }


def _batches(
    world: Path,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    stop: int = 4,
    workers: int = 0,
    monkeypatch=None,
) -> list[dict]:
    if monkeypatch is not None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    cfg = build_config(
        "tiny",
        overrides={"data.path": str(world), "data.format": "wds", "data.wds_shuffle_buffer": 4, "seed": 1},
    )
    sizes = {"image": 4, "text": 4, "pair": 4}
    ds = WdsStepBatches(wds_streams(cfg, sizes), KeyMaker(), sizes, seed=1, rank=rank, world_size=world_size)
    return list(make_step_loader(ds, start, stop, workers))


def _keys(batches: list[dict], stream: str) -> list[int]:
    return [int(k) for b in batches for k in b[stream]["key"]]


def test_ranks_read_disjoint_shards(world, monkeypatch):
    # 40 training images in 8 shards of 5: two steps of 4 per rank stay within one epoch
    r0 = _batches(world, 0, 2, stop=2, monkeypatch=monkeypatch)
    r1 = _batches(world, 1, 2, stop=2, monkeypatch=monkeypatch)
    for stream in ("image", "pair"):
        a, b = _keys(r0, stream), _keys(r1, stream)
        assert len(set(a)) == len(a) == 4 and len(set(b)) == len(b) == 4
        assert not set(a) & set(b), stream


def test_resume_position_gives_the_same_batches(world, monkeypatch):
    whole = _batches(world, stop=5, monkeypatch=monkeypatch)
    tail = _batches(world, start=3, stop=5, monkeypatch=monkeypatch)
    assert len(whole) == 5 and len(tail) == 2
    for a, b in zip(whole[3:], tail, strict=True):
        for stream in ("image", "text", "pair"):
            assert torch.equal(a[stream]["key"], b[stream]["key"]) and torch.equal(
                a[stream]["seed"], b[stream]["seed"]
            )
    assert _keys(whole[:1], "text") != _keys(whole[1:2], "text")


def test_workers_read_their_own_shards(world, monkeypatch):
    got = _batches(world, stop=4, workers=2, monkeypatch=monkeypatch)
    assert len(got) == 4
    keys = _keys(got, "pair")
    assert len(set(keys)) == len(keys) == 16  # no record twice: each worker has its own shards


def test_pretrain_streams_the_shards(world, tmp_path):
    out = tmp_path / "run"
    rc = cli_main(
        tiny_pretrain_args(
            world,
            out,
            4,
            **{"--data.format": "wds", "--data.text_vocab_size": "100", "--save-every": "2", "--logging.log_every": "1"},
        )
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss/image.mim", "loss/text.mlm", "loss/pair.mlm"} <= set(r) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["heldout"]) == {"image.mim", "text.mlm", "pair.mlm"}  # held out from the val files
