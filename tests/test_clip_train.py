"""Contrastive training (task: clip recipes): OpenClipart caption shards from SVG metadata, the training run with
its evaluations, checkpoints and resume, counted skips of bad pairs, two processes with ClipLoss's all-gather, and
open_clip's ViT as a baseline behind the same interface."""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import zoo
from recipes.clip import contrastive_loss, train_clip
from recipes.config import RecipeError, load_recipe
from recipes.distributed import Ranks, init_ranks
from recipes.shards import openclipart_pairs, write_openclipart_shards, write_shards
from test_classify import fmnist_dir  # noqa: F401  (fixture)
from zoo.cli import main as zoo_main

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "circle", "bar", "cross"]
TINY = ["model=RWKV-CLIP-tiny", "model_args.image_size=32", "model_args.patch_size=8", "batch_size=8",
        "data.workers=0", "data.shuffle_buffer=16", "optim.warmup_steps=2", "optim.lr=2e-3"]


def svg(title: str, keywords: list[str], creator: str = "Jane Doe") -> str:
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
            f'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title><dc:subject><rdf:Bag>{items}'
            f'</rdf:Bag></dc:subject><dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>'
            f'</cc:Work></rdf:RDF></metadata></svg>')


def drawing(color: str, shape: str, size: tuple[int, int] = (48, 40), mode: str = "RGBA") -> Image.Image:
    """A shape in a colour on a transparent (RGBA) or white background."""
    image = Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else "white")
    draw, (w, h) = ImageDraw.Draw(image), size
    box = {"square": (8, 8, w - 8, h - 8), "bar": (4, h // 2 - 4, w - 4, h // 2 + 4),
           "circle": (8, 8, w - 8, h - 8), "cross": (w // 2 - 3, 4, w // 2 + 3, h - 4)}[shape]
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    if shape == "cross":
        draw.rectangle((4, h // 2 - 3, w - 4, h // 2 + 3), fill=color)
    return image


@pytest.fixture(scope="module")
def clipart_root(tmp_path_factory) -> Path:
    """An openclipart-like tree (png/ and svg/ side by side): 16 captioned drawings, plus one entry of each kind
    that must be skipped."""
    root = tmp_path_factory.mktemp("openclipart")
    for sub in ("png/shapes", "svg/shapes"):
        (root / sub).mkdir(parents=True)

    def add(stem: str, image: Image.Image | bytes | None, metadata: str):
        if isinstance(image, Image.Image):
            image.save(root / "png" / "shapes" / f"{stem}.png")
        elif image is not None:
            (root / "png" / "shapes" / f"{stem}.png").write_bytes(image)
        (root / "svg" / "shapes" / f"{stem}.svg").write_text(metadata)

    for color in COLORS:
        for shape in SHAPES:
            add(f"{color}_{shape}", drawing(color, shape, (400, 200)),
                svg(f"{color}_{shape}2", [shape, "Jane Doe", "", "hash", "drawing"]))
    add("untitled", drawing("red", "bar"), svg("", ["bar"]))
    add("numbers", drawing("red", "bar"), svg("1234", ["bar"]))
    for i in range(3):                                              # a collection's name, not a title
        add(f"icon{i}", drawing("blue", "bar"), svg("Flat Icon Collection", ["icon"]))
    add("no_png", None, svg("Lonely SVG", ["svg"]))
    add("broken_svg", drawing("red", "bar"), "<svg><metadata>")
    add("broken_png", b"\x89PNG\r\n\x1a\n not really", svg("Broken Picture", ["png"]))
    return root


def test_openclipart_captions_come_from_titles_and_keywords(clipart_root, tmp_path):
    pairs, skipped = openclipart_pairs(clipart_root, max_title_repeats=2)
    captions = dict((path.stem, caption) for path, caption in pairs)
    # underscores become spaces, the trailing number goes, keywords naming the author, empty ones and "hash" go
    assert captions["red_square"] == "red square: drawing"
    assert captions["blue_cross"] == "blue cross: drawing"
    assert skipped == {"no png": 1, "unreadable svg": 1, "no usable title": 2, "collection title": 3}
    assert "broken_png" in captions                                  # the image is only opened when written

    info = write_openclipart_shards(tmp_path / "shards", clipart_root, val_percent=25, max_side=32,
                                    max_title_repeats=2, shard_samples=4)
    assert info["train"]["samples"] + info["val"]["samples"] == 16 and info["val"]["samples"] > 0
    assert sum(info[split]["skipped"].get("unreadable image", 0) for split in info) == 1   # broken_png
    assert info["train"]["kind"] == "captions" and info["val"]["skipped"]["collection title"] == 3
    with tarfile.open(sorted((tmp_path / "shards" / "train").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".webp"))
        image = Image.open(io.BytesIO(tar.extractfile(member).read()))
    assert image.mode == "RGB" and max(image.size) == 32 and image.size == (32, 16)
    assert image.getpixel((0, 0)) == (255, 255, 255)                 # transparency flattened onto white
    written = []
    for shard in sorted((tmp_path / "shards" / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            written += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert len(written) == info["train"]["samples"] and written != sorted(written)   # shuffled, not by category
    with pytest.raises(SystemExit, match="apt-get install openclipart-svg"):
        zoo_main(["data", "shards", "openclipart", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "o")])


def write_pairs(folder: Path, pairs: list[tuple[object, str]], shard_samples: int = 8) -> None:
    """Caption shards of (PIL image or raw bytes, caption) pairs."""
    def samples():
        for i, (image, caption) in enumerate(pairs):
            data = image
            if isinstance(image, Image.Image):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                data = buffer.getvalue()
            yield {"__key__": f"{i:09d}", "png": data, "txt": caption}
    write_shards(samples(), folder, {"kind": "captions"}, shard_samples)


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> Path:
    """16 distinct (drawing, caption) pairs, 4 times over for training (plus an empty caption and an undecodable
    image, which training must skip and count), once for val."""
    root = tmp_path_factory.mktemp("captions")
    pairs = [(drawing(c, s, mode="RGB"), f"a {c} {s}") for c in COLORS for s in SHAPES]
    train = pairs * 4
    train[5], train[20] = (train[5][0], "  "), (b"\x89PNG\r\n\x1a\n not an image", "a broken picture")
    write_pairs(root / "train", train)
    write_pairs(root / "val", pairs)
    return root


def run(out: Path, source: Path, *extra: str) -> dict:
    return train_clip(load_recipe("clip/rwkv_clip_b32_openclipart",
                                  [f"out_dir={out}", f"data.source={source}", *TINY, *extra]))


def read_rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_clip_recipe_trains_evaluates_checkpoints_and_resumes(tmp_path, caption_shards, fmnist_dir):  # noqa: F811
    out = tmp_path / "run"
    result = run(out, caption_shards, "epochs=6", "eval_every=3", "save_every=3",
                 f"data.zeroshot=fashion-mnist:{fmnist_dir}")
    rows = read_rows(out)
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 6 * 8                                      # 64 training pairs / 8 per step
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3          # it learns
    evals = [r for r in rows if r["val_loss"]]
    assert [int(r["epoch"]) for r in evals] == [3, 6] and all(r["zeroshot_acc1"] for r in evals)
    assert float(evals[-1]["val_loss"]) < float(evals[0]["val_loss"])
    assert int(rows[-2]["skipped_samples"]) >= 1                     # the empty caption and the broken image
    final = result["final"]
    assert 0 <= final["zeroshot_acc1"] <= final["zeroshot_acc5"] <= 1
    assert final["mean_recall"] > 0.6 and final["image_retrieval_recall@1"] > 0.4   # chance: 0.33 and 0.06
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert (out / "loss.png").exists()
    written = json.loads((out / "eval.json").read_text())
    assert written["epoch"] == 6 and written["text_retrieval_recall@5"] == final["text_retrieval_recall@5"]

    resumed = run(out, caption_shards, "epochs=7", "eval_every=7", "resume=auto", "data.zeroshot=null")
    assert [int(r["epoch"]) for r in read_rows(out) if r["val_loss"]] == [3, 6, 7]
    assert "zeroshot_acc1" not in resumed["final"]
    model = zoo.load_checkpoint(out / "model")
    assert model.config.image_size == 32
    report = tmp_path / "retrieval.json"
    zoo_main(["eval", "retrieval", "--checkpoint", str(out / "model"), "--data", str(caption_shards / "val"),
              "--json", str(report)])
    assert json.loads(report.read_text())["samples"] == 16


def test_clip_recipe_refuses_what_it_cannot_do(tmp_path, caption_shards):
    with pytest.raises(RecipeError, match="strategy=ddp"):
        load_recipe("clip/rwkv_clip_b32_openclipart", ["strategy=fsdp"])
    with pytest.raises(RecipeError, match="unknown model 'RWKV-CLIP-B-33'"):
        load_recipe("clip/rwkv_clip_b32_openclipart", ["model=RWKV-CLIP-B-33"])
    with pytest.raises(RecipeError, match="rwkv4-tiny is a language model; task clip trains clip models"):
        load_recipe("clip/rwkv_clip_b32_openclipart", ["model=rwkv4-tiny"])
    with pytest.raises(SystemExit, match="not caption shards"):
        write_shards([{"__key__": "0", "cls": 1}], tmp_path / "images" / "train", {"kind": "images"})
        zoo_main(["train", "clip/rwkv_clip_b32_openclipart", f"out_dir={tmp_path / 'x'}",
                  f"data.source={tmp_path / 'images'}", *TINY])


def test_open_clip_vit_baseline_has_the_same_interface(tmp_path):
    model, _, preprocess = zoo.create_model_and_transforms("openclip-ViT-S-32", image_size=64)
    tokenizer = zoo.get_tokenizer("openclip-ViT-S-32")
    images = torch.stack([preprocess(drawing("red", "square", mode="RGB")), preprocess(drawing("blue", "bar"))])
    out = model.eval()(images, tokenizer(["a red square", "a blue bar"]))
    assert out["image_features"].shape == out["text_features"].shape == (2, 384)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert "model.logit_scale" in model.no_weight_decay() and "model.visual.conv1.weight" not in model.no_weight_decay()
    zoo.save_checkpoint(model, tmp_path / "vit", name="openclip-ViT-S-32")
    again = zoo.load_checkpoint(tmp_path / "vit").eval()
    torch.testing.assert_close(again.encode_image(images), model.encode_image(images))


def _gathered_loss_worker(rank: int, port: int, features: tuple, out: str, local_loss: bool) -> None:
    """One of two gloo processes: its half of the batch through contrastive_loss, loss and feature gradients saved."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    ranks = init_ranks("cpu", "ddp")
    rows = slice(4 * rank, 4 * rank + 4)
    image, text = (f[rows].clone().requires_grad_() for f in features)
    loss = contrastive_loss(ranks, local_loss)(image, text, torch.tensor(10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad}, f"{out}/rank{rank}.pt")
    ranks.close()


@pytest.mark.parametrize("local_loss", [False, True])
def test_contrastive_loss_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path, local_loss):
    """Gradients averaged over the processes (what DDP does) equal one process's on the global batch of 8, and the
    loss is the global batch's (the mean over processes with local_loss)."""
    import socket

    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    features = tuple(torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1) for _ in range(2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gathered_loss_worker, args=(port, features, str(tmp_path), local_loss), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    image, text = (f.clone().requires_grad_() for f in features)
    loss = contrastive_loss(Ranks(0, 1, torch.device("cpu")))(image, text, torch.tensor(10.0))
    loss.backward()
    torch.testing.assert_close((got[0]["loss"] + got[1]["loss"]) / 2, loss.detach())
    for key, full in (("image", image.grad), ("text", text.grad)):
        torch.testing.assert_close(torch.cat([got[0][key], got[1][key]]) / 2, full)


def test_two_processes_train_from_caption_shards(tmp_path, caption_shards):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "zoo", "train", "--nproc", "2", "clip/rwkv_clip_b32_openclipart", f"out_dir={out}",
           f"data.source={caption_shards}", *TINY, "epochs=2", "eval_every=2", "data.zeroshot=null"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "contrastive batch: 8 pairs x 2 processes (ddp, cpu) = 16" in result.stdout
    rows = read_rows(out)
    assert len([r for r in rows if r["loss"]]) == 2 * 4 and [r["epoch"] for r in rows if r["val_loss"]] == ["2"]
    assert zoo.load_checkpoint(out / "model").config.image_size == 32
