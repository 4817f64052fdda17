"""VQ-KD: parity with the official code, released key layout, quantiser behaviour, loading and saving."""

from __future__ import annotations

import pytest
import torch

from imglish.evaluation.parity_vqkd import released_key_cases, run_vqkd_cases
from imglish.tokenizers.vqkd import (
    VQKD,
    NormEMAQuantizer,
    VQKDConfig,
    create_vqkd,
    list_vqkd_models,
    load_vqkd,
    save_vqkd,
    spherical_kmeans,
)
from tests.conftest import parity_file


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(parity_file("official-vqkd-tiny.pt"), map_location="cpu", weights_only=True)


def _tiny(**kw) -> VQKD:
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_depth=1, n_code=16,
               code_dim=4, decoder_out_dim=12)
    cfg.update(kw)
    return VQKD(VQKDConfig(**cfg))


def test_official_fixture_passes(fixture):
    results = run_vqkd_cases(fixture)
    names = [r.name for r in results]
    assert {"load_weights", "tokens", "quantize", "decoded"} <= set(names)
    failed = [f"{r.name}: {r.detail}" for r in results if not r.passed]
    assert not failed, failed
    assert all(r.max_abs_diff <= 1e-4 for r in results)


def test_released_tokenizer_keys_equal_ours(fixture):
    released = fixture["released_tokenizer_keys"]
    assert set(released) == {"vqkd_encoder_base_decoder_1x768x12_clip", "vqkd_encoder_base_decoder_3x768x12_clip"}
    results = released_key_cases(released)
    assert len(results) == 2 and all(r.passed for r in results), [r.detail for r in results]


def test_parity_runner_detects_wrong_weights(fixture):
    broken = dict(fixture)
    weights = dict(fixture["weights"])
    weights["encoder.blocks.0.attn.v_bias"] = weights["encoder.blocks.0.attn.v_bias"] + 0.5
    broken["weights"] = weights
    results = {r.name: r for r in run_vqkd_cases(broken)}
    assert not results["decoded"].passed or not results["quantize"].passed
    broken["weights"] = {k: v for k, v in weights.items() if k != "quantize.cluster_size"}
    results = run_vqkd_cases(broken)
    assert results[0].name == "load_weights" and not results[0].passed
    assert "quantize.cluster_size" in results[0].detail
    with pytest.raises(ValueError, match="vqkd-parity/1"):
        run_vqkd_cases({"format": "beit3-parity/1"})


def test_parity_cli_runs_vqkd_files(fixture, capsys):
    from imglish.cli.main import main

    code = main(["parity", str(parity_file("official-vqkd-tiny.pt"))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tokens" in out


def test_loading_official_wrapped_files_with_a_key_report(fixture, tmp_path):
    cfg = VQKDConfig.from_dict(fixture["config"])
    sd = dict(fixture["weights"])
    extra = {"teacher_model.visual.proj": torch.zeros(2), "scaling_layer.shift": torch.zeros(3)}
    path = tmp_path / "official.pth"
    torch.save({"model": {**sd, **extra}}, path)
    model, report = load_vqkd(path, cfg)
    assert report.ok and sorted(report.dropped) == sorted(extra)
    images = fixture["inputs"]["images"]
    assert torch.equal(model.get_codebook_indices(images), fixture["outputs"]["tokens"])

    bad = dict(sd)
    bad.pop("encoder.fc_norm.weight")
    bad["encoder.pos_embed"] = torch.zeros(1, 5, cfg.embed_dim)
    bad["surprise"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_vqkd(bad, cfg)
    text = str(err.value)
    assert "missing (1): encoder.fc_norm.weight" in text
    assert "unexpected (1): surprise" in text and "encoder.pos_embed" in text
    _, loose = load_vqkd(bad, cfg, strict=False)
    assert not loose.ok and loose.missing == ["encoder.fc_norm.weight"]


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _tiny().eval()
    model.quantize.embedding.weight.copy_(torch.nn.functional.normalize(torch.randn(16, 4), dim=-1))
    path = save_vqkd(model, tmp_path / "tok.safetensors")
    again, report = load_vqkd(path)  # the config travels in the metadata
    assert report.ok and again.config == model.config
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(again.get_codebook_indices(x), model.get_codebook_indices(x))


def test_indices_shape_range_and_inputs():
    torch.manual_seed(0)
    model = _tiny(kmeans_init=False).eval()
    x = torch.rand(2, 3, 32, 32)
    idx = model.get_codebook_indices(x)
    assert idx.shape == (2, 16) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 16
    assert torch.equal(model.get_codebook_indices((x * 255).round().to(torch.uint8)),
                       model.get_codebook_indices((x * 255).round() / 255))
    assert model.get_codebook_indices(torch.rand(1, 3, 48, 48)).shape == (1, 36)  # other sizes: pos interpolation
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.get_codebook_indices(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="float"):
        model.get_codebook_indices(torch.zeros(1, 3, 32, 32, dtype=torch.int32))


def test_lookup_is_nearest_code_by_cosine():
    q = NormEMAQuantizer(n_code=8, code_dim=3, kmeans_init=False).eval()
    z = torch.randn(5, 3, 2, 2)
    zq, loss, idx = q(z)
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 3), dim=-1)
    assert torch.equal(idx, (flat @ q.embedding.weight.t()).argmax(dim=1))
    assert torch.allclose(zq.permute(0, 2, 3, 1).reshape(-1, 3), q.embedding.weight[idx], atol=1e-6)
    assert loss > 0


def test_straight_through_gradient_reaches_the_encoder():
    q = NormEMAQuantizer(n_code=8, code_dim=3, kmeans_init=False).eval()
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    zq, loss, _ = q(z)
    (zq.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_kmeans_init_then_ema_moves_codes_towards_their_data():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    data = centres.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 6)
    means, counts = spherical_kmeans(torch.nn.functional.normalize(data, dim=-1), 4, generator=torch.Generator().manual_seed(0))
    assert counts.sum() == 200
    assert torch.allclose(means.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert (means @ centres.t()).max(dim=0).values.min() > 0.95  # every true centre found

    q = NormEMAQuantizer(n_code=4, code_dim=6, decay=0.5, kmeans_init=True).train()
    assert not q.embedding.is_initialised
    z = data.reshape(200, 6, 1, 1)
    q(z)
    assert q.embedding.is_initialised
    assert torch.allclose(q.embedding.weight.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert q.cluster_size.sum() > 0  # usage statistics follow training batches
    # A code moved away from its data comes back under the EMA update.
    with torch.no_grad():
        w = q.embedding.weight
        target = w[0].clone()
        w[0] = torch.nn.functional.normalize(w[0] + 0.3 * torch.randn(6), dim=-1)
    before = float(q.embedding.weight[0] @ target)
    for _ in range(5):
        q(z)
    assert float(q.embedding.weight[0] @ target) > before


def test_eval_calls_do_not_change_the_tokenizer():
    model = _tiny(kmeans_init=True).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.get_codebook_indices(torch.rand(2, 3, 32, 32))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_dead_code_restart_moves_unused_codes_onto_data():
    q = NormEMAQuantizer(n_code=6, code_dim=3, kmeans_init=False)
    samples = torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    dead = torch.tensor([True, False, True, False, False, False])
    kept = q.embedding.weight[1].clone()
    assert q.restart_codes(dead, samples, torch.Generator().manual_seed(0)) == 2
    sims = q.embedding.weight[dead] @ samples.t()
    assert torch.allclose(sims.max(dim=1).values, torch.ones(2), atol=1e-5)
    assert torch.equal(q.embedding.weight[1], kept)


def test_registry_and_config_errors():
    assert "vqkd_encoder_base_decoder_3x768x12_clip" in list_vqkd_models()
    with pytest.raises(ValueError, match="did you mean"):
        create_vqkd("vqkd_encoder_base_decoder_3x768x12_clp")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VQKDConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="process_type"):
        VQKDConfig(process_type="dall-e")
    with pytest.raises(ValueError, match="unknown VQKDConfig keys"):
        VQKDConfig.from_dict({"img_size": 32, "bogus": 1})
    model = create_vqkd("vqkd_tiny_patch8_64", n_code=32, decoder_out_dim=None)
    assert model.config.n_code == 32 and model.config.decoder_out_dim == 192


def test_imagenet_norm_process_type():
    m = _tiny(process_type="imagenet_norm")
    x = torch.full((1, 3, 32, 32), 0.485)
    assert m.preprocess(x)[0, 0].abs().max() < 1e-6
    d = _tiny()
    assert torch.allclose(d.preprocess(torch.zeros(1, 3, 32, 32)), -torch.ones(1, 3, 32, 32))
