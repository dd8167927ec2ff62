import io
import json
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vqrae.data import (
    DataConfig,
    ResumableSampler,
    SampleKey,
    build_dataloader,
    collate_images,
    load_image,
    transform,
)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ramp(w: int, h: int) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: what a decompression bomb looks like before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return head + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _odd_files() -> dict[str, tuple[bytes, str]]:
    """file name -> (contents, the status load_image must give)."""
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half fully transparent
    deep = Image.fromarray(np.tile(np.array([0, 32896, 65535], dtype=np.uint16), (20, 7)))  # 21 x 20, I;16
    return {
        "good_wide.png": (_encode(_noise(40, 24, 1), "PNG"), "ok"),
        "good_tall.jpg": (_encode(_noise(24, 50, 2), "JPEG"), "ok"),
        "good_square.png": (_encode(_noise(32, 32, 3), "PNG"), "ok"),
        "large.jpg": (_encode(_ramp(1200, 900), "JPEG"), "ok"),
        "truncated.jpg": (_encode(_noise(64, 64, 5), "JPEG")[:600], "truncated"),
        "zero.png": (b"", "empty"),
        "text.png": (b"this is not an image\n" * 10, "not_an_image"),
        "gray.png": (_encode(Image.new("L", (20, 20), 128), "PNG"), "converted_L"),
        "rgba.png": (_encode(rgba, "PNG"), "converted_RGBA"),
        "palette.png": (_encode(_noise(20, 20, 6).convert("P"), "PNG"), "converted_P"),
        "cmyk.jpg": (_encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), "converted_CMYK"),
        "deep.png": (_encode(deep, "PNG"), "converted_I;16"),
        "tiny.png": (_encode(Image.new("RGB", (1, 1), "red"), "PNG"), "too_small"),
        "bomb.png": (_png_header_only(100_000, 100_000), "too_large"),
    }


ODD = _odd_files()
GOOD = {"ok", "converted_L", "converted_RGBA", "converted_P", "converted_CMYK", "converted_I;16"}


@pytest.fixture
def odd_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (data, _) in ODD.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("name", sorted(ODD))
def test_load_image_every_kind(odd_folder, name):
    data, want = ODD[name]
    for value in (data, str(odd_folder / name), {"bytes": None, "path": str(odd_folder / name)}):
        img, status = load_image(value)
        assert status == want
        assert (img is not None) == (want in GOOD)
        if img is not None:
            assert img.mode == "RGB"


def test_load_image_conversions_keep_content():
    rgba, _ = load_image(ODD["rgba.png"][0])
    assert rgba.getpixel((2, 5)) == (255, 255, 255)  # transparent -> white background
    assert rgba.getpixel((15, 5)) == (255, 0, 0)
    deep, _ = load_image(ODD["deep.png"][0])
    assert [deep.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    cmyk, _ = load_image(ODD["cmyk.jpg"][0])
    r, g, b = cmyk.getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60


def test_load_image_sizes_and_sources():
    assert load_image(None) == (None, "missing")
    assert load_image("/no/such/file.png") == (None, "missing")
    assert load_image(12345) == (None, "not_an_image")
    assert load_image(Image.new("LA", (10, 10)))[1] == "converted_LA"
    assert load_image(ODD["tiny.png"][0], min_side=1)[1] == "ok"
    assert load_image(ODD["good_square.png"][0], min_side=33)[1] == "too_small"
    assert load_image(ODD["large.jpg"][0], max_pixels=1_000_000) == (None, "too_large")
    full, _ = load_image(ODD["large.jpg"][0])
    assert full.size == (1200, 900)
    small, status = load_image(ODD["large.jpg"][0], draft_side=16)
    assert status == "ok" and 16 <= min(small.size) < 32 and small.size[0] > small.size[1]


def test_transform_crops_resizes_and_flips():
    img = Image.new("RGB", (48, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))  # middle third white
    rng = np.random.default_rng(0)
    center = transform(img, 16, random_crop=False, hflip=False, rng=rng)
    assert center.shape == (3, 16, 16) and center.dtype == torch.float32
    assert torch.allclose(center, torch.ones_like(center))
    windows = [transform(img.crop((x, 0, x + 16, 16)), 16, False, False, rng) for x in range(33)]
    offsets = set()
    for seed in range(40):  # every random crop is one of the 33 windows, and many windows occur
        crop = transform(img, 16, True, False, np.random.default_rng(seed))
        offsets.add(next(x for x, w in enumerate(windows) if torch.equal(w, crop)))
    assert len(offsets) > 15
    half = Image.new("RGB", (40, 20), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    out = transform(half, 8, False, False, rng)
    assert out.shape == (3, 8, 8) and out[:, :, 0].min() > 0.9 and out[:, :, -1].max() < -0.9
    flips = [transform(half, 8, False, True, np.random.default_rng(s))[0, 0, 0].item() for s in range(20)]
    assert min(flips) < -0.9 and max(flips) > 0.9  # both orientations occur
    again = [transform(half, 8, False, True, np.random.default_rng(s))[0, 0, 0].item() for s in range(20)]
    assert flips == again


def test_loader_counts_every_kind_with_workers(odd_folder, tmp_path):
    cfg = DataConfig(source=str(odd_folder), resolution=16)
    pixels = []
    want = Counter(status for _, status in ODD.values())
    for workers in (0, 2):
        cfg.num_workers = workers
        loader, sampler = build_dataloader(cfg, batch_size=len(ODD), cache_dir=str(tmp_path / "cache"))
        (batch,) = list(loader)
        assert batch.data_stats == want  # counted in the workers, delivered with the batch
        assert batch.pixels.shape == (sum(want[s] for s in GOOD), 3, 16, 16)
        assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
        assert batch.sampler_state == {"epoch": 0, "rows": len(ODD)}
        pixels.append(batch.pixels)
    assert torch.equal(*pixels)  # same crops whatever the number of workers


def test_text_columns_and_missing_values(tmp_path):
    folder = tmp_path / "captioned"
    folder.mkdir()
    captions = ["a red square", "", None, "a blue circle", "   ", "noise"]
    with open(folder / "metadata.jsonl", "w") as f:
        for i, cap in enumerate(captions):
            _noise(12, 12, i).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": cap}) + "\n")
    cfg = DataConfig(source=str(folder), resolution=8, text_columns=["caption"], random_crop=False, hflip=False)
    loader, _ = build_dataloader(cfg, batch_size=6, cache_dir=str(tmp_path / "cache"))
    (batch,) = list(loader)
    assert batch.data_stats == Counter({"ok": 3, "missing_caption": 3})
    by_index = dict(zip(batch.index.tolist(), batch.text["caption"]))
    assert by_index == {0: "a red square", 3: "a blue circle", 5: "noise"}
    with pytest.raises(ValueError, match="text columns"):
        build_dataloader(DataConfig(source=str(folder), text_columns=["label_x"]), 2, cache_dir=str(tmp_path / "c"))


def test_split_folders_load_their_own_rows_as_split_inference_does(tmp_path):
    import datasets

    from vqrae.data import open_source

    root = tmp_path / "splits"
    for split, n in (("train", 5), ("test", 3)):
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.jsonl", "w") as f:
            for i in range(n):
                _noise(12, 12, i).save(root / split / f"{i}.png")
                f.write(json.dumps({"file_name": f"{i}.png", "caption": f"{split} {i}"}) + "\n")
    for split, n in (("train", 5), ("test", 3)):
        cfg = DataConfig(source=str(root), split=split, text_columns=["caption"])
        rows = open_source(cfg, cache_dir=str(tmp_path / "cache"))
        inferred = datasets.load_dataset("imagefolder", data_dir=str(root), split=split, cache_dir=str(tmp_path / "c2"))
        assert sorted(rows["caption"]) == sorted(inferred["caption"]) == [f"{split} {i}" for i in range(n)]
    with pytest.raises(ValueError):  # a split with no folder is still an error, not an empty data set
        open_source(DataConfig(source=str(root), split="validation"), cache_dir=str(tmp_path / "cache"))


def test_collate_with_only_bad_rows():
    batch = collate_images([{"index": 0, "status": "empty", "sampler_state": None}])
    assert len(batch) == 0 and batch.pixels.shape[0] == 0 and batch.data_stats == Counter({"empty": 1})


def _keys(batches):
    return [[(k.index, k.epoch) for k in b] for b in batches]


@pytest.mark.parametrize("num_items,world_size,batch_size", [(23, 2, 3), (40, 3, 4), (10, 1, 10)])
def test_sampler_splits_ranks_disjointly(num_items, world_size, batch_size):
    samplers = [ResumableSampler(num_items, r, world_size, seed=7, batch_size=batch_size) for r in range(world_size)]
    epochs = []
    for epoch in range(2):
        batches = [list(s) for s in samplers]
        assert {k.epoch for bs in batches for b in bs for k in b} == {epoch}
        per_rank = [[k.index for b in bs for k in b] for bs in batches]
        assert all(len(p) == len(samplers[0]) * batch_size for p in per_rank)
        rows = [i for p in per_rank for i in p]
        assert len(rows) == len(set(rows)) and set(rows) <= set(range(num_items))
        epochs.append(rows)
    if num_items > batch_size * world_size:
        assert epochs[0] != epochs[1]  # a new permutation each epoch
    with pytest.raises(ValueError):
        ResumableSampler(5, 0, 2, 0, batch_size=3)


def test_sampler_resume_mid_epoch_matches_uninterrupted():
    ref = ResumableSampler(50, 1, 2, seed=3, batch_size=4)  # 6 batches per epoch
    uninterrupted = [b for _ in range(3) for b in ref]
    assert [b[0].epoch for b in uninterrupted] == [0] * 6 + [1] * 6 + [2] * 6
    assert uninterrupted[0][0].position == 8 and uninterrupted[5][0].position == 48  # rows of all ranks
    for cut in (4, 6, 9):
        state = uninterrupted[cut - 1][0].state()
        resumed = ResumableSampler(50, 1, 2, seed=3, batch_size=4)
        resumed.load_state_dict(state)
        again = [b for _ in range(3) for b in resumed][: len(uninterrupted) - cut]
        assert _keys(again) == _keys(uninterrupted[cut:])
    # A sampler stopped part-way reports what it handed out.
    s = ResumableSampler(50, 1, 2, seed=3, batch_size=4)
    it = iter(s)
    next(it), next(it)
    assert s.state_dict() == {"epoch": 0, "rows": 16}


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_sampler_resumed_on_another_number_of_ranks_sees_each_row_of_the_epoch_once(before, after):
    n, b, seed = 61, 2, 5
    old = [ResumableSampler(n, r, before, seed, b) for r in range(before)]
    its = [iter(s) for s in old]
    seen = [k.index for _ in range(3) for it in its for k in next(it)]  # 3 batches on every rank, then a stop
    states = [s.state_dict() for s in old]
    assert len({tuple(sorted(st.items())) for st in states}) == 1 and states[0]["rows"] == 3 * b * before
    new = [ResumableSampler(n, r, after, seed, b) for r in range(after)]
    for s in new:
        s.resume(states)
    rest = [[k for batch in s for k in batch] for s in new]  # the rest of the epoch on each new rank
    assert {k.epoch for r in rest for k in r} == {0}
    rows = seen + [k.index for r in rest for k in r]
    assert len(rows) == len(set(rows)), "a row of the epoch was seen twice"
    # every row is seen, but for the incomplete batch the new ranks drop at the end of the epoch
    assert n - len(rows) == (n - 3 * b * before) % (b * after)
    assert set(rows) == set(old[0].epoch_order(0)[: len(rows)])  # the epoch's permutation, in its order


def test_sampler_reads_a_state_saved_in_batches_per_rank():
    s = ResumableSampler(50, 0, 1, seed=3, batch_size=4)
    s.load_state_dict({"epoch": 1, "position": 3}, world_size=2)  # 3 batches of 4 on each of 2 ranks
    assert s.state_dict() == {"epoch": 1, "rows": 24}
    with pytest.raises(ValueError, match="different data positions"):
        s.resume([{"epoch": 0, "rows": 8}, {"epoch": 0, "rows": 16}])
    with pytest.raises(ValueError, match="outside an epoch"):
        s.load_state_dict({"epoch": 0, "rows": 51})


def test_loader_resume_with_prefetching_workers(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(24):
        _noise(20, 14, i).save(folder / f"{i:02d}.png")
    cfg = DataConfig(source=str(folder), resolution=8, num_workers=2)
    cache = str(tmp_path / "cache")
    loader, _ = build_dataloader(cfg, batch_size=5, cache_dir=cache)  # 4 batches an epoch
    full = [b for _ in range(2) for b in loader]
    assert len(full) == 8
    loader2, sampler2 = build_dataloader(cfg, batch_size=5, cache_dir=cache)
    sampler2.load_state_dict(full[2].sampler_state)
    rest = [b for _ in range(2) for b in loader2][:5]
    for a, b in zip(rest, full[3:]):
        assert torch.equal(a.index, b.index) and torch.equal(a.pixels, b.pixels)
    assert not torch.equal(full[0].pixels, full[4].pixels)  # epochs differ in order and crops


def _write_shards(folder, n_shards=2, per_shard=6):
    wds = pytest.importorskip("webdataset")
    names = []
    for s in range(n_shards):
        path = folder / f"train-{s:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                n = s * per_shard + i
                sink.write({"__key__": f"sample{n:04d}", "png": _encode(_noise(16, 12, n), "PNG"), "txt": f"row {n}"})
        names.append(path)
    return names


def test_webdataset_shards_load(tmp_path):
    _write_shards(tmp_path)
    pattern = str(tmp_path / "train-{000..001}.tar")
    cfg = DataConfig(source=pattern, resolution=8, text_columns=["txt"])
    loader, sampler = build_dataloader(cfg, batch_size=4, cache_dir=str(tmp_path / "cache"))
    batches = list(loader)
    assert len(batches) == 3 and sum(b.data_stats["ok"] for b in batches) == 12
    texts = sorted(t for b in batches for t in b.text["txt"])
    assert texts == sorted(f"row {n}" for n in range(12))
    glob_cfg = DataConfig(source=str(tmp_path / "train-*.tar"), resolution=8)
    assert len(build_dataloader(glob_cfg, 4, cache_dir=str(tmp_path / "cache"))[1]) == 3


def test_streaming_shards_ranks_and_resume(tmp_path):
    _write_shards(tmp_path, n_shards=2, per_shard=8)
    cfg = DataConfig(source=str(tmp_path / "train-*.tar"), streaming=True, resolution=8, text_columns=["txt"],
                     shuffle_buffer=4)

    def take(n, rank=0, world=1, workers=0, state=None):
        cfg.num_workers = workers
        loader, stream = build_dataloader(cfg, batch_size=3, rank=rank, world_size=world)
        if state:
            stream.load_state_dict(state)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out

    def text(batches):
        return [b.text["txt"] for b in batches]

    full = take(8)  # 5 chunks an epoch: runs into the second epoch
    assert [b.sampler_state for b in full[4:6]] == [{"epoch": 0, "position": 5}, {"epoch": 1, "position": 1}]
    assert sorted(t for b in full[:5] for t in b.text["txt"]) != sorted(t for b in full[5:] for t in b.text["txt"])
    assert text(take(8, workers=2)) == text(full)  # order independent of the number of workers
    assert text(take(5, workers=2, state=full[2].sampler_state)) == text(full[3:8])
    ranks = [{t for b in take(2, rank=r, world=2) for t in b.text["txt"]} for r in range(2)]
    assert not ranks[0] & ranks[1] and len(ranks[0]) == len(ranks[1]) == 6


def test_direct_access_is_epoch_zero_and_crops_follow_the_epoch(odd_folder, tmp_path):
    from vqrae.data import ImageRows, open_source

    cfg = DataConfig(source=str(odd_folder), resolution=8)
    source = open_source(cfg, cache_dir=str(tmp_path / "cache"))
    rows = ImageRows(source, cfg)
    (large,) = [i for i, r in enumerate(source) if r["image"]["path"].endswith("large.jpg")]
    direct, keyed = rows[large], rows[SampleKey(large, 0, 1)]
    assert direct["sampler_state"] is None and keyed["sampler_state"] == {"epoch": 0, "position": 1}
    assert torch.equal(direct["pixels"], keyed["pixels"])
    per_epoch = {tuple(rows[SampleKey(large, e, 1)]["pixels"].flatten().tolist()) for e in range(12)}
    assert len(per_epoch) > 2  # each epoch draws its own crop and flip
