import importlib.util
import itertools
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from demo import shapes as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL_ATTRS = [
    S.ShapeAttrs(shape, colour, size, pos, bg)
    for shape, colour, size, pos, bg in itertools.product(S.SHAPES, S.COLOURS, S.SIZES, S.POSITIONS, S.BACKGROUNDS)
]


def _degrade(img: Image.Image, rng: np.random.Generator, radius=1.2, noise=15.0, jitter=20.0) -> Image.Image:
    """Blur, per-pixel noise and a colour shift: roughly what a lossy decoder does to an image."""
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    a = a + rng.normal(0, noise, a.shape) + rng.uniform(-jitter, jitter, 3)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def test_palette_is_separable():
    colours = [np.array(c) for c in S.COLOURS.values()]
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)) > 120
    for bg in S.BACKGROUNDS.values():
        assert min(np.linalg.norm(c - np.array(bg)) for c in colours) > 140


def test_sampling_and_rendering_are_deterministic():
    first = [S.sample_attrs(random.Random(5)) for _ in range(3)]
    again = [S.sample_attrs(random.Random(5)) for _ in range(3)]
    assert first == again
    def run(seed):
        rng = random.Random(seed)
        return [S.sample_attrs(rng) for _ in range(50)]

    assert run(1) == run(1) and run(1) != run(2)
    a = ALL_ATTRS[123]
    assert np.array_equal(np.asarray(S.render(a)), np.asarray(S.render(a)))
    assert S.render(a).size == (S.IMAGE_SIZE, S.IMAGE_SIZE) and S.render(a, 96).size == (96, 96)


def test_render_draws_the_shape_where_it_says():
    img = np.asarray(S.render(S.ShapeAttrs("square", "red", "large", "bottom right", "gray"), 66))
    assert tuple(img[0, 0]) == S.BACKGROUNDS["gray"]
    assert tuple(img[55, 55]) == S.COLOURS["red"]  # centre of the bottom-right cell
    assert (img[:44, :44] == S.BACKGROUNDS["gray"]).all()  # nothing outside that cell
    small = S.render(S.ShapeAttrs("square", "red", "small", "center", "black"), 66)
    large = S.render(S.ShapeAttrs("square", "red", "large", "center", "black"), 66)
    area = [int((np.asarray(im)[..., 0] == 255).sum()) for im in (small, large)]
    assert area[1] / area[0] == pytest.approx((S.SIZES["large"] / S.SIZES["small"]) ** 2, rel=0.15)


def test_a_shape_is_cut_into_the_same_patches_in_every_cell():
    """At IMAGE_SIZE a grid cell is 2x2 patches of the demo tokenizer (8 px): a shape stays inside its cell and
    its pixels there are the same wherever the cell is, so its patch contents are too."""
    cell = S.IMAGE_SIZE // 3
    assert S.IMAGE_SIZE % 3 == 0 and cell % 8 == 0
    for shape in S.SHAPES:
        for size in S.SIZES:
            cells = set()
            for i, pos in enumerate(S.POSITIONS):
                img = np.asarray(S.render(S.ShapeAttrs(shape, "red", size, pos, "black")))[..., 0] > 0
                (r, c), inside = divmod(i, 3), np.zeros_like(img)
                inside[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = True
                assert img[inside].any() and not img[~inside].any(), (shape, size, pos)
                cells.add(img[inside].tobytes())
            assert len(cells) == 1, (shape, size)


@pytest.mark.parametrize("scheme", sorted(S.HELD_OUT))
def test_held_out_combinations_never_in_train_and_every_attribute_still_is(scheme):
    rng = random.Random(0)
    train = [S.sample_attrs(rng, "train", scheme) for _ in range(3000)]
    test = [S.sample_attrs(rng, "test", scheme) for _ in range(600)]
    held = S.HELD_OUT[scheme]
    assert not {S.held_out_key(a, scheme) for a in train} & held
    assert {S.held_out_key(a, scheme) for a in test} == set(held)
    seen = {S.held_out_key(a, scheme) for a in train}
    assert seen | held == {S.held_out_key(a, scheme) for a in ALL_ATTRS}  # nothing else is missing from training
    for field, values in (("colour", S.COLOURS), ("shape", S.SHAPES), ("size", S.SIZES), ("position", S.POSITIONS),
                          ("background", S.BACKGROUNDS)):
        assert {getattr(a, field) for a in train} == set(values)
        assert {getattr(a, field) for a in test} == set(values)
    with pytest.raises(ValueError, match="split must be"):
        S.sample_attrs(rng, "validation", scheme)


def test_placement_scheme_only_holds_out_places():
    held = S.HELD_OUT["placements"]
    # every colour-shape pair is held out at exactly one position, so every pair is still seen in training
    assert sorted((c, s) for c, s, _ in held) == sorted(itertools.product(S.COLOURS, S.SHAPES))
    for c in S.COLOURS:  # each colour and each shape loses distinct positions
        assert len({p for c2, _, p in held if c2 == c}) == len(S.SHAPES)
    for s in S.SHAPES:
        assert len({p for _, s2, p in held if s2 == s}) == len(S.COLOURS)
    assert {p for *_, p in held} == set(S.POSITIONS)
    with pytest.raises(ValueError, match="held_out must be one of"):
        S.sample_attrs(random.Random(0), "train", "colours")
    with pytest.raises(ValueError, match="held_out must be one of"):
        S.held_out_key(S.ShapeAttrs("circle", "red", "small", "top", "black"), "shapes")


def test_captions_and_questions_name_every_attribute():
    rng = random.Random(0)
    for a in ALL_ATTRS[::7]:
        for text in (S.caption(a), S.caption(a, rng)):
            for word in (a.size, a.colour, a.shape, a.position, a.background):
                assert word in text, (word, text)
        qa = dict(S.questions(a))
        assert qa["What colour is the shape?"] == a.colour and qa["What shape is it?"] == a.shape
        assert qa["Where is the shape?"] == a.position and qa["How big is the shape?"] == a.size
    assert S.caption(ALL_ATTRS[0]) == "a small red circle at the top left on a black background"
    assert len({S.caption(ALL_ATTRS[0], rng) for _ in range(40)}) > 2  # several phrasings


def test_classifier_on_every_clean_render():
    result = S.score([S.render(a) for a in ALL_ATTRS], ALL_ATTRS)  # every combination, once
    assert result["colour"] >= 0.99 and result["position"] >= 0.99 and result["size"] >= 0.99
    assert result["shape"] >= 0.95 and result["background"] == 1.0


@pytest.mark.parametrize("size", [64, 128])
def test_classifier_at_other_image_sizes(size):
    attrs = ALL_ATTRS[::11]
    result = S.score([S.render(a, size) for a in attrs], attrs)
    assert result["colour"] >= 0.99 and result["position"] >= 0.99 and result["shape"] >= 0.9


@pytest.mark.parametrize("radius,noise,jitter,min_shape", [(1.2, 15.0, 20.0, 0.9), (1.5, 20.0, 25.0, 0.8)])
def test_classifier_survives_blur_noise_and_colour_shift(radius, noise, jitter, min_shape):
    rng = np.random.default_rng(0)
    attrs = ALL_ATTRS[::5]
    result = S.score([_degrade(S.render(a), rng, radius, noise, jitter) for a in attrs], attrs)
    assert result["colour"] >= 0.95 and result["position"] >= 0.95 and result["size"] >= 0.9
    assert result["shape"] >= min_shape


def test_classifier_on_upscaled_decoder_like_output():
    rng = np.random.default_rng(1)
    attrs = ALL_ATTRS[::20]
    upscaled = [S.render(a).resize((256, 256), Image.Resampling.BICUBIC) for a in attrs]  # demo-size data, 256px model
    assert S.score([_degrade(u, rng, radius=4.0, noise=10.0) for u in upscaled], attrs)["all"] >= 0.9


def test_classifier_accepts_arrays_and_tensors_and_spots_blank_images():
    a = S.ShapeAttrs("star", "cyan", "large", "left", "gray")
    img = S.render(a)
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
    assert S.classify(img) == S.classify(np.asarray(img)) == S.classify(tensor) == a
    assert S.classify(Image.new("RGB", (64, 64), S.BACKGROUNDS["gray"])).shape == "none"
    wrong = S.score([img, img], [a, S.ShapeAttrs("circle", "red", "large", "left", "gray")])
    assert wrong["shape"] == 0.5 and wrong["colour"] == 0.5 and wrong["position"] == 1.0 and wrong["all"] == 0.5


def test_write_imagefolder_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "shapes"
    info = S.write_imagefolder(str(out), num_train=30, num_test=12, seed=3, size=32)
    assert info["num_train"] == 30 and json.loads((out / "shapes.json").read_text()) == info
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert ds["train"].num_rows == 30 and ds["test"].num_rows == 12
    for col in ("caption", "colour", "shape", "size", "position", "background", "questions"):
        assert col in ds["train"].column_names
    row = ds["train"][0]
    assert row["image"].size == (32, 32)
    assert {"question": "What shape is it?", "answer": row["shape"]} in row["questions"]
    # every row asks all five questions, in an order that varies, so the first answer is not always the colour
    firsts = {r["questions"][0]["question"] for r in ds["train"]}
    assert len(firsts) >= 3 and all(len(r["questions"]) == 5 for r in ds["train"])
    keys = ["colour", "shape", "position"]
    assert all(tuple(r[k] for k in keys) not in S.HELD_OUT["placements"] for r in ds["train"].select_columns(keys))
    assert all(tuple(r[k] for k in keys) in S.HELD_OUT["placements"] for r in ds["test"].select_columns(keys))
    attrs = S.ShapeAttrs(row["shape"], row["colour"], row["size"], row["position"], row["background"])
    assert np.array_equal(np.asarray(row["image"]), np.asarray(S.render(attrs, 32)))


def test_write_imagefolder_is_deterministic_and_skips_identical_work(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    S.write_imagefolder(str(a), 8, 4, seed=1)
    S.write_imagefolder(str(b), 8, 4, seed=1)
    for split in ("train", "test"):
        assert sorted(os.listdir(a / split)) == sorted(os.listdir(b / split))
        for name in os.listdir(a / split):
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes()
    stamp = os.stat(a / "train" / "000000.png").st_mtime_ns
    os.utime(a / "train" / "000000.png", ns=(stamp - 10**9, stamp - 10**9))
    S.write_imagefolder(str(a), 8, 4, seed=1)  # same arguments: nothing rewritten
    assert os.stat(a / "train" / "000000.png").st_mtime_ns == stamp - 10**9
    S.write_imagefolder(str(a), 5, 4, seed=2)  # new arguments: rewritten
    assert len(os.listdir(a / "train")) == 5 + 1
    assert (a / "train" / "metadata.jsonl").read_text() != (b / "train" / "metadata.jsonl").read_text()
    S.write_imagefolder(str(a), 5, 40, seed=2, held_out="pairs")  # another scheme: rewritten, pairs held out
    rows = [json.loads(line) for line in (a / "test" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {(r["colour"], r["shape"]) for r in rows} <= S.HELD_OUT["pairs"]
    assert json.loads((a / "shapes.json").read_text())["held_out"] == "pairs"
    with pytest.raises(ValueError, match="held_out must be one of"):
        S.write_imagefolder(str(a), 5, 4, held_out="sizes")
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "mine.png").write_bytes(b"")
    with pytest.raises(FileExistsError):
        S.write_imagefolder(str(foreign), 2, 2)


def test_demo_folder_feeds_the_data_pipeline(tmp_path):
    from vqrae.data import DataConfig, build_dataloader

    S.write_imagefolder(str(tmp_path / "shapes"), num_train=8, num_test=4, size=32)
    cfg = DataConfig(source=str(tmp_path / "shapes"), resolution=32, text_columns=["caption"], random_crop=False,
                     hflip=False)
    loader, _ = build_dataloader(cfg, batch_size=4, cache_dir=str(tmp_path / "cache"))
    batches = list(loader)
    assert len(batches) == 2 and all(b.data_stats == {"ok": 4} for b in batches)
    for batch in batches:
        for pixels, text in zip(batch.pixels, batch.text["caption"]):
            got = S.classify(pixels)
            assert got.colour in text and got.shape in text


def test_standin_encoder_patch_targets_name_the_shape_wherever_it_covers_a_patch():
    spec = importlib.util.spec_from_file_location("standin", os.path.join(ROOT, "scripts", "train_standin_vfm.py"))
    standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standin)
    x, labels, targets = standin.draw(40, seed=0)
    p, palette = standin.ARCH["patch_size"], standin.PALETTE
    partly = 0
    for i in range(len(x)):
        colour, background = list(S.COLOURS)[labels["colour"][i]], list(S.BACKGROUNDS)[labels["background"][i]]
        bg = torch.tensor(S.BACKGROUNDS[background], dtype=torch.float) / 127.5 - 1
        fg = ((x[i] - bg[:, None, None]).abs().amax(0) > 0.2).float()
        cover = fg.unfold(0, p, p).unfold(1, p, p).mean((-1, -2)).flatten()
        on = cover >= 0.25
        partly += int(((cover >= 0.25) & (cover < 0.75)).sum())
        # the shape's colour even where it fills only part of a patch, whose mean colour is no palette colour
        assert on.any() and [palette[k] for k in targets[i, on, 0]] == [colour] * int(on.sum())
        assert [palette[k] for k in targets[i, ~on, 0]] == [background] * int((~on).sum())
        assert (targets[i, on, 1] == labels["shape"][i]).all() and (targets[i, ~on, 1] == len(S.SHAPES)).all()
    assert partly > 40
