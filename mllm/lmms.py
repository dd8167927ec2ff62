"""A saved unified model as an lmms-eval model (the ``eval`` extra: ``pip install -e ".[eval]"``).

lmms-eval finds the class through the ``lmms_eval.models`` entry point this package installs, so its own
command line runs any of its tasks on a model directory or hub id::

    lmms-eval --model vqrae --model_args pretrained=outputs/demo/mllm/model --tasks mme,pope --batch_size 8

``scripts/eval_mllm.py`` does the same over lmms-eval's Python API with the tasks in ``eval_tasks/`` included.
The model-side work needs no lmms-eval: ``mllm.inference.answer_questions`` (``generate_until``: batched greedy
or sampled answers, the ones ``answer_question`` gives one at a time) and ``continuation_logprob`` below
(``loglikelihood``: multiple-choice scoring).
"""
from __future__ import annotations

import json
from typing import Optional, Union

import torch
from PIL import Image

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from .inference import answer_budget, answer_questions, load_model, question_rows
from .model import UnifiedModel
from .sampling import answer_sampling

MODEL_ID = "vqrae"  # the name lmms-eval's --model takes


def continuation_logprob(
    model: UnifiedModel, image: Optional[Union[Image.Image, torch.Tensor]], context: str, continuation: str
) -> tuple[float, bool]:
    """log p(``continuation`` | ``context`` about ``image``) summed over its tokens, and whether greedy decoding
    would produce exactly those tokens. The continuation is the answer turn of the ``answer_question`` prompt;
    its leading whitespace (lmms-eval's target delimiter) is dropped, as an answer in training starts the turn."""
    ids, _, image_mask, pixels, length = question_rows(model, [image], [context])
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
                answers = answer_questions(self.model, images, questions, max_new_tokens=max_new, sampling=sampling, until=until)
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
