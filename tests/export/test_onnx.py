"""ONNX export: every part of tiny models exported at batch 2 and checked with onnxruntime at batch 1 and 5 (and
two text lengths) against PyTorch; the captioning pair decodes the same caption as PyTorch's greedy search; the CLI,
external data and the errors."""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import imglish
from imglish.cli.main import main
from imglish.export import export_onnx, verify_onnx
from imglish.export.onnx import example_inputs, onnx_greedy_search
from imglish.generation import GenerationConfig, greedy_search
from tests.inference.conftest import make_checkpoint

VOCAB = 64
IMG = 32


def tiny(task: str) -> torch.nn.Module:
    kwargs = {"num_classes": 5} if task in ("imageclassification", "vqav2") else {}
    torch.manual_seed(0)
    model = imglish.create_model(f"beit3_tiny_patch16_224_{task}", img_size=IMG, vocab_size=VOCAB, depth=2,
                                 **kwargs)
    with torch.no_grad():  # heads with spread, so that the logits are not all near zero
        for p in model.parameters():
            if p.ndim == 2 and p.shape[0] < 10:
                p.normal_(0, 0.5)
    return model.eval()


def dims(graph, name: str) -> list:
    value = next(v for v in list(graph.input) + list(graph.output) if v.name == name)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def caption_files(tmp_path_factory):
    model = tiny("captioning")
    folder = tmp_path_factory.mktemp("onnx_caption")
    results = {part: export_onnx(model, part, folder / f"{part}.onnx", verify=True)
               for part in ("encoder", "decoder_step")}
    return model, results


@pytest.mark.parametrize(("task", "part", "names_in", "names_out"), [
    ("retrieval", "image_encoder", ["image"], ["image_embeds"]),
    ("retrieval", "text_encoder", ["text_ids", "padding_mask"], ["text_embeds"]),
    ("imageclassification", "model", ["image"], ["logits"]),
    ("vqav2", "model", ["image", "question", "padding_mask"], ["logits"]),
    ("nlvr2", "model", ["image_a", "image_b", "text", "padding_mask"], ["logits"]),
])
def test_part_exports_and_matches_pytorch(tmp_path, task, part, names_in, names_out):
    model = tiny(task)
    result = export_onnx(model, part, tmp_path / f"{part}.onnx", verify=True)  # traced at batch 2
    assert result.inputs == names_in and result.outputs == names_out
    assert result.checked_batches == [(1, 5), (5, 11)]  # dynamic batch (and text length) were run
    assert set(result.max_abs_diff) == set(names_out)
    assert all(diff <= 1e-4 for diff in result.max_abs_diff.values())
    graph = onnx.load(str(tmp_path / f"{part}.onnx")).graph
    assert [v.name for v in graph.input] == names_in and [v.name for v in graph.output] == names_out
    assert isinstance(dims(graph, names_in[0])[0], str)  # a symbolic batch dimension
    if "text_ids" in names_in or "question" in names_in:
        assert isinstance(dims(graph, names_in[-1])[1], str)  # a symbolic text length
    # the same numbers from a fresh session, at a batch the export never saw
    inputs = example_inputs(model, part, batch=3, text_len=7, seed=11)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        if part == "image_encoder":
            want = model.encode_image(inputs["image"])
        elif part == "text_encoder":
            want = model.encode_text(inputs["text_ids"], inputs["padding_mask"])
        elif task == "nlvr2":
            want = model(image_a=inputs["image_a"], image_b=inputs["image_b"], text_description=inputs["text"],
                         padding_mask=inputs["padding_mask"])
        else:
            want = model(**inputs)
    assert got.shape == tuple(want.shape) and got.shape[0] == 3
    torch.testing.assert_close(torch.from_numpy(got), want.float(), atol=1e-4, rtol=0)
    assert want.abs().max() > 1e-2  # a comparison of real numbers, not of zeros


def test_caption_parts_have_the_cache_as_inputs_and_outputs(caption_files):
    model, results = caption_files
    cfg = model.config
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    for result in results.values():
        assert result.outputs == ["logits", "present_keys", "present_values"]
        assert all(diff <= 1e-4 for diff in result.max_abs_diff.values())
        graph = onnx.load(str(result.path)).graph
        keys = dims(graph, "present_keys")
        assert keys[0] == cfg.depth and keys[2] == heads and keys[4] == head_dim
        assert isinstance(keys[1], str) and isinstance(keys[3], str)  # batch and cached length are dynamic
    assert results["decoder_step"].inputs == ["text_ids", "past_keys", "past_values"]


def test_onnx_captioning_decodes_as_pytorch_greedy_search(caption_files):
    model, results = caption_files
    torch.manual_seed(3)
    image = torch.randn(3, 3, IMG, IMG)
    cfg = GenerationConfig(max_len=12, num_beams=1, mask_token_id=VOCAB - 1)
    want = greedy_search(model, image, cfg)
    got = onnx_greedy_search(results["encoder"].path, results["decoder_step"].path, image, cfg)
    assert (got == want.numpy()).all()
    assert (want[:, 1:] != cfg.pad_token_id).sum() >= 6  # several real steps through the cache were compared


def test_verify_fails_when_the_file_is_not_the_model(tmp_path):
    model = tiny("imageclassification")
    result = export_onnx(model, "model", tmp_path / "model.onnx")
    assert result.max_abs_diff is None
    with torch.no_grad():
        model.head.weight.mul_(1.5)  # the PyTorch side changes, the file does not
    with pytest.raises(ValueError, match=r"output 'logits' at batch 1 differs from PyTorch by"):
        verify_onnx(model, result)


def test_cli_exports_a_finetuned_checkpoint_with_external_data(tmp_path, infer_tokenizer, capsys):
    checkpoint = make_checkpoint(tmp_path / "ck", "vqa", infer_tokenizer)
    out = tmp_path / "out" / "vqa.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--part", "model", "--out", str(out), "--verify",
                 "--external-data"]) == 0
    printed = capsys.readouterr().out
    assert "inputs image, question, padding_mask -> outputs logits" in printed
    assert "verified with onnxruntime (CPU) at batch 1 (text 5), batch 5 (text 11)" in printed
    data = out.with_name("vqa.onnx.data")
    assert data.is_file() and data.stat().st_size > out.stat().st_size  # the weights live beside the graph
    assert not list(out.parent.glob("*.tmp*"))
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"vqa.onnx.data"}
    model, _ = imglish.create_model_and_processor(None, str(checkpoint))
    inputs = example_inputs(model, "model", batch=4, text_len=9)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(**inputs), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("kind", "part", "message"), [
    ("retrieval", "model", ("part 'model' exports imageclassification or vqav2 or nlvr2 models, this is a "
                            "retrieval model; its parts are image_encoder, text_encoder")),
    ("caption", "image_encoder", ("part 'image_encoder' exports retrieval models, this is a captioning model; its "
                                  "parts are encoder, decoder_step")),
])
def test_cli_wrong_part_is_one_line_and_exit_2(tmp_path, infer_tokenizer, capsys, kind, part, message):
    checkpoint = make_checkpoint(tmp_path / "ck", kind, infer_tokenizer)
    out = tmp_path / "x.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--part", part, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"imglish export: error: {message}"
    assert not out.exists()


def test_errors_name_the_input(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "none.safetensors"), "--part", "model", "--out",
                 str(tmp_path / "x.onnx")]) == 2
    assert "checkpoint '" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(bad), "--part", "model", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "weights_only" not in err and err.count("\n") == 1
    for flags, message in ((["--batch", "0"], "batch must be at least 1, got 0"),
                           (["--text-len", "1"], "text_len must be an integer of at least 2"),
                           (["--atol", "-1"], "atol must be a positive number, got -1.0"),
                           (["--threads", "-2"], "--threads must be at least 1, got -2")):
        assert main(["export", "--checkpoint", str(bad), "--part", "model", "--out", str(tmp_path / "x.onnx"),
                     *flags]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown part 'towers'; expected one of image_encoder, text_encoder"):
        export_onnx(tiny("retrieval"), "towers", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="this is a backbone model; no part exports it"):
        export_onnx(imglish.create_model("beit3_tiny_patch16_224", img_size=IMG, depth=1), "model",
                    tmp_path / "x.onnx")
