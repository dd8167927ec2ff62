"""Fast autoregressive sampling over any Hugging Face causal LM with an explicit KV cache.

Generation is a set of functions, not a model method: the caller owns the KV cache (``new_cache``) and
passes it in; nothing is stored on the model. Each call is a prefill (the whole prompt in one forward pass)
followed by one-token decode steps through the model's normal forward (``cache=``, ``position_ids=``,
``logits_to_keep=1``), so any ``AutoModelForCausalLM`` (LLaMA, Qwen2/3, ...) works unchanged.

Speed against ``lm.generate`` comes from doing less per step: no logits-processor lists or stopping
criteria, a pre-allocated static KV cache written in place (a dynamic cache copies itself every step), one
attention mask and one position tensor allocated up front, logits for the last position only, and
``torch.inference_mode``. Image steps compute only the K code logits: when the model's logits are its output
layer applied to its base model's last hidden state (checked on one token per call), only the output
layer's code rows are applied; otherwise the full logits are sliced. On CUDA the one-token decode step can
run through ``torch.compile`` (CUDA graphs).

Image generation uses classifier-free guidance (Ho & Salimans, 2022) with the conditional and unconditional
prompts in one batch of 2B rows: guided logits = u + s (c - u).

With ``SamplingConfig(decoding="jacobi")`` image codes take fewer forwards than one per code: speculative Jacobi
decoding (Teng et al., 2024, ``_jacobi_codes``) feeds a window of draft codes per forward and keeps the drafts the
speculative-sampling rule accepts, which leaves the distribution of the codes exactly the autoregressive one.
"""
from __future__ import annotations

import functools
import inspect
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from .model import split_output_layer
from .sampling import SamplingConfig
from .vocab import ImageVocab

# transformers 5 names the forward argument of the KV cache `cache`; earlier releases `past_key_values`.
_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
# On a CPU a dynamic cache beat the static one at 2 rows (one prompt with guidance: 1.14x) and lost at 32 (0.85x)
DYNAMIC_ROWS_CPU = 4


def sample_logits(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row from logits (N, V) with temperature, top-k and top-p; returns (N,) int64.

    The result is a deterministic function of the logits and the generator state. ``cfg.cfg_scale`` and
    ``cfg.seed`` are not used here.
    """
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    return _draw(processed_probs(logits, cfg), generator)


def processed_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution ``sample_logits`` draws from: float probabilities (..., V) after temperature, top-k and
    top-p; one-hot at the argmax when greedy (temperature 0)."""
    if cfg.temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits.float()  # softmax over bf16 logits loses the tail
    if cfg.temperature != 1:
        logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the top one always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None, greedy: bool = False) -> torch.Tensor:
    """One index per row of (possibly unnormalised) probabilities (..., V); the argmax when ``greedy``."""
    if greedy:
        return probs.argmax(dim=-1)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i (the Gumbel-max
    # trick in another form) without multinomial's host synchronisation. The clamp keeps p = 0 tokens at 0
    # should a draw underflow to 0.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def _accepts(coin: torch.Tensor, p_x: torch.Tensor, q_x: torch.Tensor, lenience: float = 1.0) -> torch.Tensor:
    """Speculative sampling's test: a draft x drawn from q is kept with probability min(1, p(x) / q(x)), given
    coins uniform in [0, 1) (all 0 when greedy: kept exactly when p(x) > 0); ``lenience`` > 1 scales p(x) up
    (lossy)."""
    return coin * q_x < lenience * p_x


def new_cache(lm: PreTrainedModel, batch: int, max_len: int, *, static: bool = True) -> Cache:
    """An empty KV cache for ``lm``: a ``StaticCache`` pre-allocated for ``batch`` rows of ``max_len``
    tokens (prompt + generated), or a ``DynamicCache`` that grows by concatenation.

    The static cache writes each step in place; the dynamic one copies itself every step, which costs more
    than attending over the unused static slots. Image generation with guidance runs 2B rows.
    """
    if not static:
        return DynamicCache(config=lm.config)
    cache = StaticCache(config=lm.config, max_cache_len=max_len)
    text = lm.config.get_text_config(decoder=True)
    # Not every config spells these out: head_dim defaults to hidden/heads and MHA configs omit kv heads.
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    cache.early_initialization(batch, kv_heads, head_dim, lm.dtype, lm.device)
    return cache


@torch.inference_mode()
def generate_image_codes(
    lm: PreTrainedModel,
    prompt_ids: list[list[int]],
    vocab: ImageVocab,
    num_tokens: int,
    sampling: SamplingConfig,
    *,
    uncond_ids: list[list[int]] | None = None,
    pad_id: int,
    generator: torch.Generator | None = None,
    cache: Cache | None = None,
    compile_step: bool = False,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample ``num_tokens`` image codes for each prompt; returns code indices (B, num_tokens) in [0, K).

    Each prompt ends right before the image; ``<boi>`` is appended here. Prompts may differ in length: rows
    are left-padded with ``pad_id`` under an attention mask and per-row positions, so a prompt gives the
    same codes in any batch as alone. Only the K code logits are sampled from, so no other token can appear.

    Args:
        lm: causal LM whose vocabulary holds the image tokens, possibly PEFT-wrapped (call ``lm.eval()`` first).
        prompt_ids: B token-id lists (the conditions).
        vocab: the image tokens' ids in the extended vocabulary.
        num_tokens: code tokens per image (H * W of the token grid).
        sampling: temperature / top-k / top-p / guidance scale / seed / decoding (autoregressive or Jacobi).
        uncond_ids: unconditional prompts for guidance, B lists or one list shared by all rows. Required
            unless ``sampling.cfg_scale == 1``; when None only the B conditional rows run.
        pad_id: token id used for left padding (masked out, never attended to).
        generator: RNG on the model's device; default: one seeded with ``sampling.seed``, else torch's global RNG.
        cache: KV cache to fill, e.g. ``new_cache(lm, 2 * B, max_prompt_len + num_tokens, static=True)``
            reused across calls; it is reset first. Default: sized for this call; static, except dynamic for at
            most ``DYNAMIC_ROWS_CPU`` rows on a CPU, where that measured faster (docs/benchmarks.md).
        compile_step: on CUDA, run each one-token step through ``torch.compile`` with CUDA graphs; needs a
            static cache (the default) and autoregressive decoding. Ignored on other devices.
        positions: (num_tokens, H) embeddings of the image-token indices (``UnifiedModel.image_positions``):
            row t is added to the input embedding of code t when it is fed back. None: codes go in as ids.
    """
    batch = len(prompt_ids)
    if positions is not None and positions.shape[0] != num_tokens:
        raise ValueError(f"positions must hold one row per image token ({num_tokens}), got {tuple(positions.shape)}")
    if batch == 0:
        raise ValueError("prompt_ids is empty: pass at least one prompt")
    guided = uncond_ids is not None
    if guided:
        if len(uncond_ids) not in (1, batch):
            raise ValueError(f"uncond_ids must hold 1 or {batch} prompts (one per prompt), got {len(uncond_ids)}")
        uncond = list(uncond_ids) * batch if len(uncond_ids) == 1 else list(uncond_ids)
        rows = [list(p) + [vocab.boi_id] for p in list(prompt_ids) + uncond]
    elif sampling.cfg_scale != 1:
        raise ValueError(f"cfg_scale={sampling.cfg_scale} needs uncond_ids; pass them or set cfg_scale=1")
    else:
        rows = [list(p) + [vocab.boi_id] for p in prompt_ids]

    n = num_tokens
    jacobi = sampling.decoding == "jacobi"
    if jacobi and sampling.window > n:
        raise ValueError(f"window={sampling.window} is longer than the image's {n} codes: use 1 to {n}")
    if jacobi and compile_step:
        raise ValueError("compile_step compiles the one-token step of decoding 'autoregressive'; 'jacobi' runs uncompiled")
    device = lm.device
    ids, mask = _left_pad(rows, pad_id, device)
    lo = vocab.code_offset
    run = _Decoder(lm, {"input_ids": ids}, mask, n - 1, cache, compile_step, vocab=(lo, lo + vocab.codebook_size))
    generator = _generator(sampling, generator, device)

    def guide(code_logits: torch.Tensor) -> torch.Tensor:  # (rows, ..., K) -> (B, ..., K)
        if not guided:
            return code_logits
        cond, uncond_logits = code_logits[:batch].float(), code_logits[batch:].float()
        # u + s (c - u) written as c + (s - 1)(c - u), which is exactly c at s = 1.
        return cond + (sampling.cfg_scale - 1) * (cond - uncond_logits)

    code_logits = run.prefill()  # (rows, K): the only tokens an image may contain
    if jacobi:
        return _jacobi_codes(run, guide, code_logits, sampling, generator, n, lo, len(rows) // batch, positions)
    codes = torch.empty(batch, n, dtype=torch.long, device=device)
    step_ids = torch.empty(len(rows), 1, dtype=torch.long, device=device)
    for t in range(n):
        idx = sample_logits(guide(code_logits), sampling, generator)  # (B,)
        codes[:, t] = idx
        if t == n - 1:
            break
        # Both halves of a guided batch continue with the same sampled code.
        step_ids.view(-1, batch).copy_((idx + lo).expand(step_ids.numel() // batch, batch))
        code_logits = run.step(step_ids, None if positions is None else positions[t])
    return codes


def _jacobi_codes(
    run: "_Decoder",
    guide,
    first_logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    n: int,
    lo: int,
    copies: int,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """Speculative Jacobi decoding (Teng et al., 2024) of n codes per image after a prefill; returns (B, n).

    Each image row b holds ``seq[b]``: its accepted codes (the first ``accepted[b]``), then drafts. The cache
    holds the prompt and the first ``cached`` codes, the same count for every row: the fewest any row has both
    accepted and fed (every row's last accepted code is not fed yet). A forward feeds codes
    ``cached .. cached + w - 1`` (per row: accepted codes, then drafts) and gives p for codes
    ``cached + 1 .. cached + w``. Row by row, from its first unaccepted code, a draft x drawn from q is kept
    with probability min(1, p(x) / q(x)); at the first rejection a code is drawn from norm(max(0, p - q)) and
    the drafts after it are dropped (Leviathan et al., 2023, speculative sampling), so each accepted code is a
    draw from p given the codes before it, exactly as in autoregressive decoding. When every draft is kept the
    window's last p gives one more code. p and q are the processed (temperature, top-k, top-p, guidance)
    distributions, so the rule samples from the processed one.

    Rows accept different counts. A row ahead re-feeds its accepted codes beyond the shared cache length in the
    next window (recomputed, never sampled again), so no row waits for another and none is cut back; a row ahead
    by d codes has d fewer draft slots, so it stays less than one window ahead. Every forward accepts at least
    one code per unfinished row, and the cache is rolled back to the shared length after each, so it ends
    holding the prompt and the first n - 1 codes, as after sequential decoding.

    Drafts after a rejection are drawn afresh from the latest forward's p (the Jacobi update); a code no forward
    has reached yet gets one from ``sampling.draft_init``. Each draft is tested at most once, against the p of
    the forward that follows its draw; that is what keeps the rule exact (a tested draft would be biased).
    """
    greedy = sampling.temperature == 0
    p0 = processed_probs(guide(first_logits), sampling)  # (B, K): code 0, as in autoregressive decoding
    batch, k = p0.shape
    device = p0.device
    width = sampling.window
    uniform = p0.new_full((batch, k), 1 / k)

    def initial(p_last: torch.Tensor) -> torch.Tensor:  # (B, K): proposal for codes no forward reached yet
        return p_last if sampling.draft_init == "last" else uniform

    seq = torch.zeros(batch, n, dtype=torch.long, device=device)
    seq[:, 0] = _draw(p0, generator, greedy)
    accepted = torch.ones(batch, dtype=torch.long, device=device)
    cached = 0
    # q[:, i]: the distribution the draft of code cached + 1 + i was drawn from
    init = initial(p0)
    q = init[:, None].expand(batch, width, k).clone()
    if n > 1:
        seq[:, 1:width] = _draw(q[:, : width - 1], generator, greedy)
    slots = torch.arange(width, device=device)
    while cached < n - 1:
        w = min(width, n - 1 - cached)
        ids = (seq[:, cached : cached + w] + lo).repeat(copies, 1)  # guided: both halves feed the same codes
        p = processed_probs(guide(run.window(ids, cached, None if positions is None else positions[cached : cached + w])), sampling)
        # p[:, i]: code cached + 1 + i; its draft (i < w - 1) is seq[:, cached + 1 + i], drawn from q[:, i]
        drafts = seq[:, cached + 1 : cached + w]
        p_x = p[:, : w - 1].gather(-1, drafts[..., None])[..., 0]
        q_x = q[:, : w - 1].gather(-1, drafts[..., None])[..., 0]
        coin = torch.zeros_like(p_x) if greedy else torch.rand(p_x.shape, generator=generator, device=device)
        keep = _accepts(coin, p_x, q_x, sampling.lenience)
        keep |= slots[: w - 1] < (accepted - cached - 1)[:, None]  # codes this row had already accepted
        # first rejected slot per row; w - 1 (no draft there) when every draft is kept
        stop = torch.cat([~keep, keep.new_ones(batch, 1)], dim=1).int().argmax(dim=1)
        p_stop = p[torch.arange(batch, device=device), stop]  # (B, K)
        q_stop = torch.where((stop < w - 1)[:, None], q[torch.arange(batch, device=device), stop], 0)
        residual = (p_stop - q_stop).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_stop)
        code = _draw(residual, generator, greedy)
        fresh = _draw(p, generator, greedy)  # (B, w): new drafts after the stop
        window = seq[:, cached + 1 : cached + 1 + w]
        new = torch.where(slots[:w] < stop[:, None], window, torch.where(slots[:w] == stop[:, None], code[:, None], fresh))
        active = accepted < n
        seq[:, cached + 1 : cached + 1 + w] = torch.where(active[:, None], new, window)
        accepted = torch.where(active, cached + stop + 2, accepted)
        # Host sync once per forward: the shared cache length decides the next window.
        shift = int(accepted.min()) - 1 - cached
        # Proposals for the next window: this forward's p where it reached, then the initial one.
        init = initial(p[:, w - 1])
        reached = p[:, shift:]
        q = torch.cat([reached, init[:, None].expand(batch, width - reached.shape[1], k)], dim=1)
        start, stop_code = cached + 1 + w, min(cached + shift + width, n)  # codes entering the next window
        if start < stop_code:  # no row has accepted any of them (an unfinished row has accepted < start)
            drafts = _draw(q[:, w - shift : w - shift + stop_code - start], generator, greedy)
            seq[:, start:stop_code] = torch.where((accepted < n)[:, None], drafts, seq[:, start:stop_code])
        cached += shift
    return seq


@torch.inference_mode()
def generate_text(
    lm: PreTrainedModel,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_id: int | Sequence[int] | None,
    generator: torch.Generator | None = None,
    cache: Cache | None = None,
    compile_step: bool = False,
) -> list[list[int]]:
    """Answer text prompts; returns the new token ids per row, cut before the first eos (not included).

    The prompt is prefilled once from ``input_ids`` (N, L) or ``inputs_embeds`` (N, L, D) (e.g. image
    features spliced into text embeddings), then tokens are decoded one id at a time until every row has
    produced an eos or ``max_new_tokens`` tokens. Prompts of unequal length must be left-padded with
    ``attention_mask`` (N, L) marking real tokens. ``sampling.cfg_scale`` is not used for text.

    Args:
        lm: causal LM, possibly PEFT-wrapped (call ``lm.eval()`` first).
        input_ids: prompt token ids; exactly one of ``input_ids`` and ``inputs_embeds``.
        inputs_embeds: prompt embeddings in the LM's input space.
        attention_mask: 1 for real tokens, 0 for left padding; default: no padding.
        max_new_tokens: upper bound on generated tokens per row.
        sampling: temperature / top-k / top-p / seed.
        eos_id: id (or ids) that end an answer; None runs to ``max_new_tokens``.
        generator: RNG on the model's device; default: one seeded with ``sampling.seed``, else torch's global RNG.
        cache: KV cache to fill (reset first); default: as ``generate_image_codes`` chooses.
        compile_step: on CUDA, compile the one-token step over a static cache (see ``generate_image_codes``).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    prompt = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
    first = next(iter(prompt.values()))
    device = first.device
    mask = torch.ones(first.shape[:2], dtype=torch.bool, device=device) if attention_mask is None else attention_mask
    run = _Decoder(lm, prompt, mask, max_new_tokens - 1, cache, compile_step)
    generator = _generator(sampling, generator, device)
    eos_ids = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    eos = torch.tensor(sorted(eos_ids), device=device) if eos_ids else None

    rows = first.shape[0]
    out = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    logits = run.prefill()
    produced = 0
    for t in range(max_new_tokens):
        tok = sample_logits(logits, sampling, generator)
        out[:, t] = tok
        produced = t + 1
        if eos is not None:
            done |= torch.isin(tok, eos)
            if bool(done.all()):  # one host sync per token; answers are short
                break
        if t < max_new_tokens - 1:
            logits = run.step(tok[:, None])

    answers = []
    for row in out[:, :produced].tolist():
        stop = next((i for i, tok in enumerate(row) if tok in eos_ids), len(row))
        answers.append(row[:stop])
    return answers


def stream_text(
    lm: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_id: Sequence[int],
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """``generate_text`` for one prompt (1, L, D), yielding each token id before the next step runs (eos not
    included).

    Inference mode is entered around each model call, not across a ``yield``: the consumer (a web server's
    worker thread, say) must not inherit it.
    """
    device = inputs_embeds.device
    eos = set(eos_id)
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=device)
    with torch.inference_mode():
        run = _Decoder(lm, {"inputs_embeds": inputs_embeds}, mask, max_new_tokens - 1, None, False)
        generator = _generator(sampling, generator, device)
        logits = run.prefill()
    for t in range(max_new_tokens):
        with torch.inference_mode():
            tok = sample_logits(logits, sampling, generator)  # (1,)
        token = int(tok)
        if token in eos:
            return
        yield token
        if t < max_new_tokens - 1:
            with torch.inference_mode():
                logits = run.step(tok[:, None])


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as left-padded ids (N, L) and a bool mask (N, L) of real tokens."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r) :] = True
    return ids.to(device), mask.to(device)


class _Decoder:
    """Prefill + one-token steps over a fixed batch, with every per-step tensor allocated once.

    ``prompt`` holds ``input_ids`` (N, L) or ``inputs_embeds`` (N, L, D); ``mask`` (N, L) marks real tokens
    (left padding is 0); ``extra`` is how many tokens will be fed after the prompt. With ``vocab=(lo, hi)``
    the logits returned are those of token ids [lo, hi) only.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        prompt: dict[str, torch.Tensor],
        mask: torch.Tensor,
        extra: int,
        cache: Cache | None,
        compile_step: bool,
        vocab: tuple[int, int] | None = None,
    ) -> None:
        self.prompt = prompt
        device = next(iter(prompt.values())).device
        mask = mask.to(device=device, dtype=torch.bool)  # the model converts 2D masks to bool on every call
        rows, length = mask.shape
        total = length + extra
        # One mask for the whole run: the prompt's padding, then ones for every token still to come. The
        # model reads the columns it needs at each step. Without padding no mask is passed, so attention
        # takes its unmasked causal path.
        if not bool(mask.all()):
            self.full_mask = torch.cat([mask, mask.new_ones(rows, extra)], dim=1)
            self.prompt_mask = self.full_mask[:, :length]
        else:
            self.full_mask = self.prompt_mask = None
        # Left padding shifts each row; positions count real tokens only (pads sit at 0, masked anyway).
        self.prompt_pos = (mask.long().cumsum(dim=-1) - 1).clamp_min(0)
        self.next_pos = mask.sum(dim=-1, keepdim=True)  # (rows, 1), advanced in place each step
        self.first_pos = self.next_pos.clone()  # (rows, 1): position of the first token after the prompt
        self.fed = 0  # tokens after the prompt in the cache (``window`` and ``rollback`` keep count)

        self.vocab = vocab
        self.embeddings = lm.get_input_embeddings()
        # With a vocabulary range, skip the output rows outside it when that gives the model's own logits.
        self.head, self.body = _separable_head(lm, vocab[1], prompt) if vocab is not None else (None, lm)

        use_compile = compile_step and device.type == "cuda"
        if cache is None:  # on a CPU a dynamic cache measured faster for a few rows, a static one for many
            cache = new_cache(lm, rows, total, static=device.type != "cpu" or use_compile or rows > DYNAMIC_ROWS_CPU)
        else:
            _check_cache(cache, rows, total)
            cache.reset()
        if use_compile and not cache.is_compileable:
            raise ValueError("compile_step=True needs a static cache: new_cache(lm, rows, max_len, static=True)")
        self.cache = cache
        self.forward = _compiled_forward() if use_compile else _forward

    def prefill(self) -> torch.Tensor:
        """Run the prompt through the model; logits of its last position (rows, V)."""
        logits = _forward(self.body, self.head, self.vocab, self.prompt, self.prompt_pos, self.prompt_mask, self.cache)
        return self._logits(logits[:, -1])

    def step(self, ids: torch.Tensor, added: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per row (rows, 1), its embedding plus ``added`` (H,) when given; logits of the next
        position (rows, V)."""
        if added is None:
            step_inputs = {"input_ids": ids}
        else:
            embeds = self.embeddings(ids)
            step_inputs = {"inputs_embeds": embeds + added.to(embeds.dtype)}
        logits = self.forward(self.body, self.head, self.vocab, step_inputs, self.next_pos, self.full_mask, self.cache)
        self.next_pos.add_(1)
        self.fed += 1
        return self._logits(logits[:, -1])

    def window(self, ids: torch.Tensor, first: int, added: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens (rows, w) as the tokens ``first .. first + w - 1`` after the prompt, the cache first rolled
        back to the prompt and ``first`` of them; token j's embedding gets ``added[j]`` ((w, H)) when given.
        Logits (rows, w, V) of the w next positions."""
        self.rollback(first)
        w = ids.shape[1]
        if added is None:
            inputs = {"input_ids": ids}
        else:
            embeds = self.embeddings(ids)
            inputs = {"inputs_embeds": embeds + added.to(embeds.dtype)}
        pos = self.first_pos + torch.arange(first, first + w, device=ids.device)
        logits = _forward(self.body, self.head, self.vocab, inputs, pos, self.full_mask, self.cache, keep=w)
        self.fed = first + w
        return self._logits(logits)

    def rollback(self, kept: int) -> None:
        """Drop cached tokens after the first ``kept`` after the prompt: a dynamic cache is cut, a static one
        only moves its write position (what lies beyond is overwritten and, being in the future, masked)."""
        if kept < self.fed:
            self.cache.crop(kept - self.fed)  # a negative count: how many tokens to remove
        self.fed = kept

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab is None or self.head is not None:
            return logits
        lo, hi = self.vocab
        if logits.shape[-1] < hi:
            raise ValueError(f"image codes end at id {hi} but the LM head has only {logits.shape[-1]} outputs")
        return logits[..., lo:hi]


def _forward(
    body: nn.Module,
    head: nn.Linear | None,
    vocab: tuple[int, int] | None,
    inputs: dict[str, torch.Tensor],
    pos: torch.Tensor,
    mask: torch.Tensor | None,
    cache: Cache,
    keep: int = 1,
) -> torch.Tensor:
    """Logits (rows, keep, V) of the last ``keep`` positions: the causal LM's own when ``head`` is None
    (``body`` is the LM), else rows ``vocab`` = [lo, hi) of the output layer ``head`` on the last hidden states
    of ``body``, the LM's base model."""
    kwargs = dict(inputs, attention_mask=mask, position_ids=pos, use_cache=True, **{_CACHE_KW: cache})
    if head is None:
        return body(**kwargs, logits_to_keep=keep).logits[:, -keep:]
    lo, hi = vocab
    hidden = body(**kwargs).last_hidden_state[:, -keep:]
    # Sliced inside the step so a compiled graph sees the layer's own parameters, not copies of views.
    return F.linear(hidden, head.weight[lo:hi], None if head.bias is None else head.bias[lo:hi])


@functools.cache
def _compiled_forward():
    compiled = torch.compile(_forward, mode="reduce-overhead", dynamic=False)

    def step(*args):
        # Each call starts a new CUDA-graph generation: the previous step's logits have been consumed.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return step


@torch.no_grad()
def _separable_head(lm: nn.Module, hi: int, prompt: dict[str, torch.Tensor]) -> tuple[nn.Linear | None, nn.Module]:
    """(output layer, base model) when the LM's logits are exactly that linear layer applied to the base
    model's last hidden state (``split_output_layer``), so any range of output rows can be computed alone;
    else (None, lm). A wrapped output layer (e.g. PEFT trainable token rows) keeps the full-logit path."""
    like = next(iter(prompt.values()))
    split = split_output_layer(lm, like if like.is_floating_point() else lm.get_input_embeddings().weight)
    if split is None or not isinstance(split[1], nn.Linear):
        return None, lm
    body, head = split
    if head.out_features < hi:
        raise ValueError(f"image codes end at id {hi} but the LM head has only {head.out_features} outputs")
    return head, body


def _check_cache(cache: Cache, rows: int, total: int) -> None:
    max_len = cache.get_max_length()
    if max_len != -1 and max_len < total:
        raise ValueError(f"the static cache holds {max_len} tokens but this call needs {total}")
    if max_len != -1 and cache.batch_size not in (-1, rows):
        raise ValueError(f"the static cache was made for {cache.batch_size} rows but this call runs {rows}")


def _generator(sampling: SamplingConfig, generator: torch.Generator | None, device: torch.device):
    if generator is not None or sampling.seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(sampling.seed)
