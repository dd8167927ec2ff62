"""A saved unified model as an lmms-eval model (the ``eval`` extra: ``pip install -e ".[eval]"``).

lmms-eval finds the class through the ``lmms_eval.models`` entry point this package installs, so its own
command line runs any of its tasks on a model directory or hub id::

    lmms-eval --model vqrae --model_args pretrained=outputs/demo/mllm/model --tasks mme,pope --batch_size 8

``scripts/eval_mllm.py`` does the same over lmms-eval's Python API with the tasks in ``eval_tasks/`` included.
The two functions below hold the model-side work and need no lmms-eval: ``answer_batch`` (``generate_until``:
batched greedy or sampled answers, laid out exactly as ``mllm.inference.answer_question`` lays one out) and
``continuation_logprob`` (``loglikelihood``: multiple-choice scoring).
"""
from __future__ import annotations

import json
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from vqrae.images import center_view

from . import SamplingConfig, generate_text, pad_token_id, understanding_prompt
from .inference import answer_budget, load_model, stop_ids
from .model import UnifiedModel
from .sampling import answer_sampling

MODEL_ID = "vqrae"  # the name lmms-eval's --model takes


def _pixels(model: UnifiedModel, image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    """A PIL image center-cropped and resized to the VQRAE's resolution (3, H, W) in [-1, 1], as in training."""
    if isinstance(image, torch.Tensor):
        return image
    return center_view(image.convert("RGB"), model.vqrae.image_size)


def _prompt_rows(model: UnifiedModel, images: Sequence[Optional[Image.Image]], questions: Sequence[str]):
    """Left-padded ids, attention mask and image mask (B, L) of the questions, and the images' pixels (M, 3, H, W)."""
    prompts = [understanding_prompt(model.tokenizer, model.vocab, q, model.vqrae.num_tokens, has_image=img is not None)
               for img, q in zip(images, questions)]
    length = max(len(p.input_ids) for p in prompts)
    pad = pad_token_id(model.tokenizer)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    attention = torch.zeros(len(prompts), length, dtype=torch.bool)
    image_mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[row, length - n:] = torch.tensor(p.input_ids)
        attention[row, length - n:] = True
        image_mask[row, length - n:] = torch.tensor(p.image_mask, dtype=torch.bool)
    pixels = [_pixels(model, img) for img in images if img is not None]
    return ids, attention, image_mask, (torch.stack(pixels) if pixels else None), length


def answer_batch(
    model: UnifiedModel,
    images: Sequence[Optional[Union[Image.Image, torch.Tensor]]],
    questions: Sequence[str],
    *,
    max_new_tokens: int = 128,
    sampling: Optional[SamplingConfig] = None,
    until: Sequence[str] = (),
    generator: Optional[torch.Generator] = None,
) -> list[str]:
    """Answers to B questions, each about its image (None: a text-only question), decoded together.

    Every row is the prompt ``mllm.inference.answer_question`` builds, left-padded to the longest; greedy
    answers are those ``answer_question`` gives one at a time. An answer stops at the model's stop tokens,
    after ``max_new_tokens`` (lowered to the positions the LLM has left) or before the first of ``until``.
    """
    if len(images) != len(questions) or not questions:
        raise ValueError(f"need one image (or None) per question, got {len(images)} images for {len(questions)} questions")
    for i, q in enumerate(questions):
        if not q.strip():
            raise ValueError(f"question {i + 1} is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling if sampling is not None else answer_sampling()
    ids, attention, image_mask, pixels, length = _prompt_rows(model, images, questions)
    max_new_tokens = answer_budget(model, length, max_new_tokens, "the longest question with its image")
    device = next(model.llm.parameters()).device
    with torch.inference_mode():
        embeds = model.embed(ids.to(device), None if pixels is None else pixels.to(device),
                             image_mask.to(device) if pixels is not None else None)  # (B, L, H)
    tokens = generate_text(model.llm, inputs_embeds=embeds, attention_mask=attention.to(device),
                           max_new_tokens=max_new_tokens, sampling=sampling, eos_id=stop_ids(model),
                           generator=generator)
    answers = [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    for stop in until:
        answers = [a.split(stop)[0] if stop else a for a in answers]
    return [a.strip() for a in answers]


def continuation_logprob(
    model: UnifiedModel, image: Optional[Union[Image.Image, torch.Tensor]], context: str, continuation: str
) -> tuple[float, bool]:
    """log p(``continuation`` | ``context`` about ``image``) summed over its tokens, and whether greedy decoding
    would produce exactly those tokens. The continuation is the answer turn of the ``answer_question`` prompt;
    its leading whitespace (lmms-eval's target delimiter) is dropped, as an answer in training starts the turn."""
    ids, _, image_mask, pixels, length = _prompt_rows(model, [image], [context])
    answer = model.tokenizer.encode(continuation.lstrip(), add_special_tokens=False)
    if not answer:
        raise ValueError(f"the continuation {continuation!r} has no tokens")
    answer_budget(model, length + len(answer) - 1, 1, "the question with its image and answer")
    device = next(model.llm.parameters()).device
    full = torch.cat([ids, torch.tensor([answer])], dim=1).to(device)  # (1, L + A)
    mask = torch.cat([image_mask, torch.zeros(1, len(answer), dtype=torch.bool)], dim=1).to(device)
    with torch.inference_mode():
        embeds = model.embed(full, None if pixels is None else pixels.to(device), mask if pixels is not None else None)
        logits = model.llm(inputs_embeds=embeds).logits[0, length - 1 : -1].float()  # (A, V): predicts each answer token
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(answer, device=device)
    total = float(logprobs.gather(1, target[:, None]).sum())
    return total, bool((logits.argmax(dim=-1) == target).all())


def _one_image(visuals, task: str) -> Optional[Image.Image]:
    visuals = [v for v in (visuals or []) if v is not None]
    if len(visuals) > 1:
        raise ValueError(f"task '{task}' gives {len(visuals)} images for one question; this model reads one")
    if visuals and not isinstance(visuals[0], (Image.Image, torch.Tensor)):
        raise ValueError(f"task '{task}' gives a {type(visuals[0]).__name__} visual; this model reads images")
    return visuals[0] if visuals else None


class VQRAELmms(lmms):
    """A ``save_pretrained`` unified model (directory or hub id) for lmms-eval.

    Args:
        pretrained: the model directory or hub id.
        device: where to run ("cpu", "cuda", "cuda:1").
        batch_size: questions answered together by ``generate_until``.
        dtype: LLM weights "float32", "bfloat16" or "float16"; default as ``mllm.inference.load_model``.
        trust_remote_code: run code shipped with the model.
    """

    is_simple = True

    def __init__(self, pretrained: str, device: Optional[str] = None, batch_size: Union[int, str] = 1,
                 dtype: Optional[str] = None, trust_remote_code: bool = False, **kwargs) -> None:
        super().__init__()
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k != "max_batch_size")
        if unknown:
            raise ValueError(f"unknown model_args {', '.join(unknown)}; valid: pretrained, device, batch_size, dtype, trust_remote_code")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(pretrained, device=device, dtype=dtype, trust_remote_code=bool(trust_remote_code))
        self.pretrained = pretrained
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; requests with the same generation settings are answered in batches."""
        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key, members in groups.items():
            settings = dict(json.loads(key))
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(settings.get("temperature") or 0.0)
            do_sample = settings.get("do_sample")
            if do_sample is False:
                temperature = 0.0
            top_p = settings.get("top_p")
            top_p = float(top_p) if temperature > 0 and top_p not in (None, 0) else 1.0
            sampling = answer_sampling(temperature=temperature, top_p=min(top_p, 1.0))
            max_new = int(settings.get("max_new_tokens") or 128)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                questions, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                    questions.append(context)
                    images.append(_one_image(doc_to_visual(self._doc(task, split, doc_id)), task))
                answers = answer_batch(self.model, images, questions, max_new_tokens=max_new, sampling=sampling, until=until)
                for i, a in zip(chunk, answers):
                    out[i] = a
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args[:6]
            doc = self._doc(task, split, doc_id)
            if callable(continuation):  # output_type loglikelihood passes the task's doc_to_target
                continuation = str(continuation(doc))
            results.append(continuation_logprob(self.model, _one_image(doc_to_visual(doc), task), context, continuation))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the vqrae model; use single-turn tasks")


MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VQRAELmms")
