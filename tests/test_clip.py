"""RWKV-CLIP with open_clip's interface: towers, the bidirectional token shift, configs, tokenizer, transforms,
encode_image / encode_text / logit_scale / forward, and bad input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
from blocks import bi_token_shift
from test_classify import fmnist_dir  # noqa: F401  (fixture)
from zoo.cli import main as zoo_main
from zoo.models.clip import RWKVCLIP, RWKVCLIPConfig


def test_bi_token_shift_takes_half_of_each_head_from_each_side():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out = bi_token_shift(x, head_size=4)
    for t in range(5):
        for c in range(8):
            if c % 4 < 2:
                expected = x[:, t - 1, c] if t > 0 else torch.zeros(2, dtype=x.dtype)
            else:
                expected = x[:, t + 1, c] if t < 4 else torch.zeros(2, dtype=x.dtype)
            torch.testing.assert_close(out[:, t, c], expected, rtol=0, atol=0)


def test_registered_configs_follow_the_paper():
    assert zoo.list_models("RWKV-CLIP*") == ["RWKV-CLIP-6-B-16", "RWKV-CLIP-6-B-32", "RWKV-CLIP-B-16", "RWKV-CLIP-B-32",
                                             "RWKV-CLIP-tiny"]     # RWKV-CLIP-6-*: tests/test_rwkv_clip6.py
    info = zoo.model_info("RWKV-CLIP-B-32")
    assert info["family"] == "clip"
    cfg = info["config"]
    assert (cfg["image_width"], cfg["image_layers"], cfg["patch_size"], cfg["text_layers"], cfg["context_length"],
            cfg["vocab_size"]) == (640, 12, 32, 6, 77, 49408)
    assert int(cfg["text_width"] * cfg["text_mlp_ratio"]) == 2240 and cfg["image_mlp_ratio"] == 5
    assert zoo.model_info("RWKV-CLIP-B-16")["config"]["patch_size"] == 16
    with pytest.raises(ValueError, match="block must be one of rwkv4-bi, rwkv6-bi, got 'rwkv5-bi'"):
        RWKVCLIPConfig(block="rwkv5-bi")


def test_open_clip_interface_on_the_tiny_model(tmp_path):
    torch.manual_seed(0)
    model, preprocess_train, preprocess_val = zoo.create_model_and_transforms("RWKV-CLIP-tiny")
    tokenizer = zoo.get_tokenizer("RWKV-CLIP-tiny")
    assert tokenizer.vocab_size == 49408 and tokenizer.context_length == 77
    images = torch.stack([preprocess_val(Image.new("RGB", (90, 60), "red")),
                          preprocess_train(Image.new("RGB", (40, 70), "blue"))])
    assert images.shape == (2, 3, 64, 64)
    text = tokenizer(["a red square", "a blue rectangle"])
    model.eval()
    out = model(images, text)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == out["text_features"].shape == (2, 64)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["image_features"], F.normalize(model.encode_image(images), dim=-1))
    torch.testing.assert_close(out["text_features"], model.encode_text(text, normalize=True))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))   # stored as a log
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(images, text)["logit_scale"].item() == 100                # clamped at 100
    zoo.save_checkpoint(model, tmp_path / "clip", name="RWKV-CLIP-tiny")    # native checkpoints round-trip
    again = zoo.load_checkpoint(tmp_path / "clip").eval()
    torch.testing.assert_close(again(images, text)["text_features"], model(images, text)["text_features"])


def test_text_features_ignore_padding_and_long_texts_are_truncated():
    model = zoo.create_model("RWKV-CLIP-tiny").eval()
    tokenizer = zoo.get_tokenizer("RWKV-CLIP-tiny")
    long = tokenizer(["word " * 200])
    assert long.shape == (1, 77) and long[0, -1].item() == tokenizer.eot_token_id   # open_clip's truncation
    text = tokenizer(["a cat"])
    length = int((text != 0).sum())
    pooled = model.text(text)
    x = model.text.token_embedding(text)
    for block in model.text.blocks:
        x = block(x, None)
    torch.testing.assert_close(pooled, model.text.ln_final(x)[:, :length].mean(1))


def test_bad_input_is_named():
    model = RWKVCLIP(zoo.factory.build_config("RWKV-CLIP-tiny"))
    images, text = torch.randn(2, 3, 64, 64), torch.ones(3, 77, dtype=torch.long)
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        model(images, text)
    with pytest.raises(ValueError, match="more than the context of 77"):
        model.encode_text(torch.ones(1, 80, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids \[B, context\]"):
        model.encode_text(torch.randn(1, 77))
    with pytest.raises(ValueError, match="not an image-text one"):
        zoo.create_model_and_transforms("vrwkv_tiny")


def test_zero_shot_classification_reports_clip_benchmark_fields(tmp_path, fmnist_dir):  # noqa: F811
    """The pipeline end to end on random weights (accuracies near chance, so only their ranges are checked), and the
    classifier it builds is open_clip's template-ensembled one: every class's mean normalised text embedding."""
    import open_clip

    from recipes.clip import TEMPLATES

    model = zoo.create_model("RWKV-CLIP-tiny")
    zoo.save_checkpoint(model, tmp_path / "clip", name="RWKV-CLIP-tiny")
    out = tmp_path / "zeroshot.json"
    zoo_main(["eval", "zeroshot", "--checkpoint", str(tmp_path / "clip"), "--dataset", f"fashion-mnist:{fmnist_dir}",
              "--workers", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["task"] == "zeroshot_classification" and report["samples"] == 80
    assert set(report) >= {"dataset", "model", "pretrained", "task", "metrics"}
    metrics = report["metrics"]
    assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 1 and 0 <= metrics["mean_per_class_recall"] <= 1

    tokenizer = zoo.get_tokenizer("clip")
    classifier = open_clip.build_zero_shot_classifier(model.eval(), tokenizer, ["cat"], TEMPLATES)
    with torch.no_grad():
        per_template = model.encode_text(tokenizer([t.format("cat") for t in TEMPLATES]), normalize=True)
    torch.testing.assert_close(classifier[:, 0], F.normalize(per_template.mean(0), dim=0))


def test_retrieval_recall_and_the_command_on_caption_shards(tmp_path):
    from recipes.clip import retrieval_metrics
    from recipes.shards import caption_samples, write_shards

    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.1, 0.2]])    # [captions, images]
    recall = retrieval_metrics(torch.eye(3), similarity)          # text features @ identity = the similarity
    assert recall["image_retrieval_recall@1"] == pytest.approx(2 / 3)    # caption 1 ranks image 0 first
    assert recall["text_retrieval_recall@1"] == 1.0 and recall["image_retrieval_recall@5"] == 1.0

    rows = ["filepath,title"]
    for i, color in enumerate(["red", "green", "blue", "white", "black", "gray"]):
        Image.new("RGB", (32, 32), color).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {color} square")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    write_shards(caption_samples(tmp_path / "pairs.csv"), tmp_path / "shards", {"kind": "captions"}, maxcount=4)
    zoo.save_checkpoint(zoo.create_model("RWKV-CLIP-tiny"), tmp_path / "clip", name="RWKV-CLIP-tiny")
    out = tmp_path / "retrieval.json"
    zoo_main(["eval", "retrieval", "--checkpoint", str(tmp_path / "clip"), "--data", str(tmp_path / "shards"),
              "--batch-size", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["task"] == "zeroshot_retrieval" and report["samples"] == 6
    metrics = report["metrics"]
    assert set(metrics) == {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}
    assert metrics["image_retrieval_recall@10"] == metrics["text_retrieval_recall@10"] == 1.0   # 6 candidates
    with pytest.raises(SystemExit, match="not caption shards"):
        write_shards([{"__key__": "0", "cls": 1}], tmp_path / "other", {"kind": "images"})
        zoo_main(["eval", "retrieval", "--model", "RWKV-CLIP-tiny", "--data", str(tmp_path / "other")])


def test_clip_benchmark_api_gives_our_numbers(fmnist_dir):  # noqa: F811
    """CLIP_benchmark's own zero-shot classification and retrieval (the optional clip-benchmark package) run our
    model unchanged and agree with recipes.clip's metrics on the same prompts and data."""
    classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    from recipes.classify import ClassifyConfig, ImageDataConfig, image_data
    from recipes.clip import retrieval_metrics, zero_shot_metrics
    from recipes.distributed import Ranks

    torch.manual_seed(0)
    model, _, preprocess = zoo.create_model_and_transforms("RWKV-CLIP-tiny")
    model.eval()
    tokenizer = zoo.get_tokenizer("RWKV-CLIP-tiny")
    ranks = Ranks(0, 1, torch.device("cpu"))
    data = image_data(ClassifyConfig(data=ImageDataConfig(f"fashion-mnist:{fmnist_dir}", workers=0), batch_size=16),
                      preprocess, preprocess, ranks)
    theirs = classification.evaluate(model, data.eval_batches(), tokenizer, data.classes, ["a drawing of a {c}."],
                                     "cpu", amp=False)
    ours = zero_shot_metrics(model, tokenizer, data, ranks, templates=("a drawing of a {}.",))
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-6), key

    images, labels = next(iter(data.eval_batches()))
    captions = [f"a drawing of a {data.classes[int(c)]} number {i}" for i, c in enumerate(labels)]
    theirs = retrieval.evaluate(model, [(images, [[c] for c in captions])], tokenizer, "cpu", amp=False,
                                recall_k_list=[1, 5, 10])
    with torch.no_grad():
        ours = retrieval_metrics(model.encode_image(images, normalize=True), model.encode_text(tokenizer(captions),
                                                                                                normalize=True))
    assert theirs == pytest.approx(ours, abs=1e-6)


@pytest.mark.parametrize("mode", [True, "selective"], ids=["full", "selective"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    torch.manual_seed(0)
    model = zoo.create_model("RWKV-CLIP-tiny")
    images, text = torch.randn(2, 3, 64, 64), zoo.get_tokenizer("clip")(["a cat", "two dogs"])

    def grads():
        model.zero_grad()
        out = model(images, text)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(mode)
    assert model.text.grad_checkpointing == mode and model.visual.grad_checkpointing == mode
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
