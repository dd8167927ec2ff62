"""A unified multimodal model: any Hugging Face causal LM + a frozen VQRAE tokenizer + an MLP projector.

Understanding (LLaVA-style): the VQRAE's continuous features (B, N, D) go through the projector to (B, N, H)
and replace the input embeddings at the positions of a boolean image mask. Generation: the VQRAE's discrete
codes are K extra vocabulary tokens, predicted by the LM head like text (see ``vocab.py``).

The LLM is wrapped, never subclassed: whatever ``AutoModelForCausalLM`` returns for the configured id or
directory is used through its public contract (input embeddings, ``inputs_embeds``, logits). A checkpoint
directory holds everything needed to rebuild the model offline::

    mllm.yaml               MLLMConfig
    tokenizer/              extended tokenizer
    llm/                    LLM weights (safetensors); with LoRA, the base weights the adapter applies to
    adapter/                PEFT adapter (LoRA matrices and the image-token rows), LoRA only
    projector.safetensors
    image_positions.safetensors   with ``image_positions`` only
    vqrae/                  copy of the VQRAE checkpoint
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from omegaconf import MISSING
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from vqrae import VQRAE
from vqrae.config import ConfigError, from_dict, to_dict
from vqrae.hub import PushToHub, resolve
from vqrae.untrusted import read_safetensors, refuse_pickled_weights, refuse_remote_code

from .projector import MLPProjector, ProjectorConfig
from .sampling import SamplingConfig
from .vocab import IGNORE_INDEX, ImageVocab, add_image_tokens, codebook_offsets, resize_embeddings

CONFIG_NAME = "mllm.yaml"
PROJECTOR_NAME = "projector.safetensors"
POSITIONS_NAME = "image_positions.safetensors"
LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # MLLMConfig.dtype


@dataclass
class LoraSettings:
    enabled: bool = False  # adapt the LLM with LoRA instead of training all of its weights
    r: int = 16  # rank of each update
    alpha: int = 32  # updates are scaled by alpha / r
    dropout: float = 0.05  # on the LoRA branch input
    # Module names to adapt; ["all-linear"] means every Linear layer of the LLM except the LM head.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class MLLMConfig:
    # Hub id (owner/name, through transformers' own hub resolution and cache) or local directory of any
    # AutoModelForCausalLM.
    llm: str = MISSING
    # VQRAE checkpoint: a VQRAE.save_pretrained directory or a hub id holding one (fetched into the Hugging Face
    # cache by vqrae.hub.resolve); its K sets the image vocabulary.
    vqrae: str = MISSING
    gguf_file: Optional[str] = None  # load this GGUF file inside `llm` (dequantised) instead of safetensors
    trust_remote_code: bool = False  # run model code shipped with `llm`; only for models that require it
    dtype: str = "bfloat16"  # LLM weights: float32, bfloat16 or float16
    gradient_checkpointing: bool = False  # recompute LLM activations in backward to save memory
    freeze_llm: bool = False  # train the projector only (understanding alignment stage)
    new_token_noise: float = 0.0  # std of noise added to the mean-initialised rows of the new tokens
    # How the K image-code rows start: "mean" (the mean of the old rows plus new_token_noise) or "codebook"
    # (the mean plus the VQRAE codebook's own geometry, of std new_token_noise: vocab.codebook_offsets). With
    # "codebook" the LLM starts knowing which codes look alike (same colour, same part of a shape).
    code_init: str = "mean"
    # A learned embedding of each image token's index (0..N-1), added to the input embedding of the code token
    # at that index. A rotary-position LLM only sees distances between tokens, and the caption before an image
    # varies in length, so it must otherwise infer where in the grid each code falls; a small LLM trained
    # briefly (the demo) learns layouts far faster with it. Starts at zero: the LLM is unchanged at step 0.
    image_positions: bool = False
    # How scripts/generate.py and scripts/score_demo.py sample images from this model unless told otherwise.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.code_init not in ("mean", "codebook"):
            raise ValueError(f"MLLMConfig.code_init must be 'mean' or 'codebook', not {self.code_init!r}")
        if self.code_init == "codebook" and self.new_token_noise <= 0:
            raise ValueError("MLLMConfig.code_init 'codebook' needs new_token_noise > 0: it sets the rows' spread")


@dataclass
class UnifiedOutput:
    # (B, L, V); None from a training forward (labels given, grad enabled), which computes logits at the
    # labelled positions only (``UnifiedModel.forward``)
    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy over labelled positions
    image_loss: Optional[torch.Tensor] = None  # same, over image targets (code tokens and <eoi>); 0 if none
    text_loss: Optional[torch.Tensor] = None  # same, over all other labelled targets; 0 if none


class UnifiedModel(nn.Module, PushToHub):
    """LLM + projector + frozen VQRAE, with the image vocabulary of ``vocab.py``.

    Args:
        cfg: settings applied here (freezing, gradient checkpointing, LoRA) and saved with the model.
        llm: a causal LM whose embeddings already hold a row for every token of ``tokenizer``.
        tokenizer: the LLM's tokenizer extended with ``add_image_tokens``.
        vqrae: the image tokenizer; frozen and kept in eval mode, so it never receives gradients.
        projector: maps VQRAE features (B, N, D) to LLM embeddings (B, N, H).
        adapter: directory of a saved PEFT adapter to load when ``cfg.lora.enabled``; None creates a new one.
        image_positions: (N, H) values for the ``cfg.image_positions`` table; None starts it at zero.

    Use ``build`` for a new model from ``cfg`` and ``from_pretrained`` for a saved one.
    """

    HUB_KIND = "mllm"  # the model card push_to_hub writes

    def __init__(
        self,
        cfg: MLLMConfig,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vqrae: VQRAE,
        projector: MLPProjector,
        adapter: Optional[str] = None,
        image_positions: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        vocab = ImageVocab.from_tokenizer(tokenizer)
        if vocab.codebook_size != vqrae.codebook_size:
            raise ValueError(
                f"tokenizer holds {vocab.codebook_size} image code tokens but the VQRAE codebook has "
                f"{vqrae.codebook_size} codes"
            )
        rows = _full_shape(llm.get_input_embeddings().weight)[0]
        if rows < len(tokenizer):
            raise ValueError(f"LLM embeddings have {rows} rows but the tokenizer has {len(tokenizer)} tokens")
        if cfg.lora.enabled and cfg.freeze_llm:
            raise ValueError("lora.enabled and freeze_llm contradict each other: pick one")
        self.cfg, self.tokenizer, self.vocab = cfg, tokenizer, vocab
        self.vqrae = vqrae.requires_grad_(False).eval()
        self.projector = projector
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
            # transformers 5 renamed the method; earlier releases only have the gradient_* name.
            kwargs = {"use_reentrant": False}
            if hasattr(llm, "activation_checkpointing_enable"):
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if cfg.freeze_llm:
            llm.requires_grad_(False)
        self._llm_keys = list(llm.state_dict().keys())  # the base names, to save the base under LoRA
        self.llm = _with_lora(llm, cfg.lora, vocab, adapter) if cfg.lora.enabled else llm
        self.image_positions: Optional[nn.Embedding] = None
        if cfg.image_positions:
            embeds = llm.get_input_embeddings().weight
            table = nn.Embedding(vqrae.num_tokens, _full_shape(embeds)[1], device=embeds.device, dtype=embeds.dtype)
            nn.init.zeros_(table.weight)
            if image_positions is not None:
                if tuple(image_positions.shape) != tuple(table.weight.shape):
                    raise ValueError(
                        f"image_positions has shape {tuple(image_positions.shape)}, expected {tuple(table.weight.shape)}"
                        " (image tokens x LLM hidden size)"
                    )
                table.weight.data.copy_(image_positions)
            table.requires_grad_(not cfg.freeze_llm)
            self.image_positions = table
        elif image_positions is not None:
            raise ValueError("image_positions values given but MLLMConfig.image_positions is off")

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: MLLMConfig, generator: Optional[torch.Generator] = None,
              llm_context: Callable[[], ContextManager] = contextlib.nullcontext) -> "UnifiedModel":
        """A new model: load the LLM and VQRAE named by ``cfg``, extend the vocabulary, add a fresh projector.

        ``generator`` draws the noise of ``cfg.new_token_noise``; the projector starts from torch's global RNG.
        The LLM is loaded and resized inside ``llm_context()`` (and nothing else is): ``mllm.train`` passes
        transformers' ZeRO-3 loading there, so each rank holds only its partition from the start.
        """
        for name in ("llm", "vqrae"):
            if getattr(cfg, name) in ("", MISSING):
                raise ValueError(f"MLLMConfig.{name} is not set")
        _check_llm_source(cfg)
        vqrae = VQRAE.from_pretrained(cfg.vqrae, trust_remote_code=cfg.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(cfg.llm, trust_remote_code=cfg.trust_remote_code, **_gguf(cfg))
        before = len(tokenizer)
        vocab = add_image_tokens(tokenizer, vqrae.codebook_size)
        with llm_context():
            with torch.random.fork_rng(devices=[]):  # however it is built, loading moves no RNG the projector uses
                llm = _load_llm(cfg.llm, cfg, cfg.trust_remote_code, gguf=True)
            resize_embeddings(llm, len(tokenizer), range(before, len(tokenizer)), before, cfg.new_token_noise, generator)
            if cfg.code_init == "codebook":
                width = llm.get_input_embeddings().embedding_dim
                offsets = codebook_offsets(vqrae.quantizer.codebook, width, cfg.new_token_noise, generator)
                resize_embeddings(llm, len(tokenizer), vocab.code_ids, before, offsets=offsets)
        projector = MLPProjector(vqrae.encoder.dim, llm.get_input_embeddings().embedding_dim, cfg.projector.depth)
        return cls(cfg, llm, tokenizer, vqrae, projector)

    @classmethod
    def from_pretrained(
        cls, path: str, trust_remote_code: bool = False, revision: Optional[str] = None,
        llm_context: Callable[[], ContextManager] = contextlib.nullcontext,
    ) -> "UnifiedModel":
        """Rebuild a ``save_pretrained`` directory, or a hub id (``owner/name``) holding one at ``revision``, with
        nothing else: a hub id is fetched once into the Hugging Face cache (``vqrae.hub.resolve``), then read
        from there exactly like a directory.

        The LLM is loaded inside ``llm_context()`` (see ``build``).

        Whether model code shipped in the directory may run is the caller's decision, never the saved config's:
        without ``trust_remote_code`` a checkpoint that needs it (``trust_remote_code: true`` in mllm.yaml, an
        ``auto_map`` beside the LLM or tokenizer) is refused. Weights are read from safetensors only.
        """
        path = resolve(path, revision, "unified model checkpoint")
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no unified model checkpoint at '{path}' (missing {CONFIG_NAME})")
        cfg = read_config(path)
        opt_in = "pass trust_remote_code=True (scripts/generate.py --trust-remote-code, training: model.trust_remote_code=true)"
        if cfg.trust_remote_code and not trust_remote_code:
            raise ConfigError(f"model '{path}' asks to run code shipped with it (trust_remote_code: true in "
                              f"{CONFIG_NAME}); {opt_in} only if you trust its source")
        llm_dir, tok_dir = os.path.join(path, "llm"), os.path.join(path, "tokenizer")
        if not trust_remote_code:
            for part in (llm_dir, tok_dir):
                refuse_remote_code(part, "model part", opt_in)
        refuse_pickled_weights(llm_dir, "model part", _SAFETENSORS_HINT)
        vqrae = VQRAE.from_pretrained(os.path.join(path, "vqrae"), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
        with llm_context():
            llm = _load_llm(llm_dir, cfg, trust_remote_code, gguf=False)
        projector = MLPProjector(vqrae.encoder.dim, llm.get_input_embeddings().embedding_dim, cfg.projector.depth)
        projector.load_state_dict(read_safetensors(os.path.join(path, PROJECTOR_NAME), "projector weights"), strict=True)
        adapter = os.path.join(path, "adapter") if cfg.lora.enabled else None
        positions = None
        if cfg.image_positions:
            positions = read_safetensors(os.path.join(path, POSITIONS_NAME), "image position table")["weight"]
        return cls(cfg, llm, tokenizer, vqrae, projector, adapter=adapter, image_positions=positions)

    def save_pretrained(self, path: str, dtype: Optional[str] = None) -> None:
        """Write the layout described in the module docstring; ``from_pretrained(path)`` gives the same logits.

        ``dtype`` is the LLM dtype ``mllm.yaml`` records for loading (default ``cfg.dtype``); the weights are
        written as they are (a trainer's fp32 master weights record the dtype it computed in)."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        self.vqrae.save_pretrained(os.path.join(path, "vqrae"))
        projector = {k: v.detach().to("cpu").contiguous() for k, v in self.projector.state_dict().items()}
        save_file(projector, os.path.join(path, PROJECTOR_NAME), metadata={"format": "pt"})
        if self.image_positions is not None:
            table = self.image_positions.weight.detach().to("cpu").contiguous()
            save_file({"weight": table}, os.path.join(path, POSITIONS_NAME), metadata={"format": "pt"})
        if self.cfg.lora.enabled:
            base = self.llm.get_base_model()
            base.save_pretrained(os.path.join(path, "llm"), state_dict=self._base_state_dict())
            # The resized matrices are already in llm/; the adapter keeps only the image-token rows.
            self.llm.save_pretrained(os.path.join(path, "adapter"), save_embedding_layers=False)
        else:
            self.llm.save_pretrained(os.path.join(path, "llm"))
        # llm/ now holds plain safetensors even if the weights came from a GGUF file: the copy never needs it
        cfg = dataclasses.replace(self.cfg, gguf_file=None, dtype=dtype or self.cfg.dtype)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

    def _base_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA model's base weights under their original names (PEFT nests them as ``*.base_layer``)."""
        state = {}
        for key, value in self.llm.get_base_model().state_dict().items():
            parts = key.split(".")
            if any(p.startswith(("lora_", "trainable_tokens_")) for p in parts):
                continue
            state[".".join(p for p in parts if p not in ("base_layer", "token_adapter"))] = value
        if set(state) != set(self._llm_keys):
            odd = sorted(set(state) ^ set(self._llm_keys))[:5]
            raise RuntimeError(f"cannot recover the LoRA model's base weight names; mismatched keys: {odd}")
        return state

    def merge_lora(self) -> None:
        """Fold the LoRA updates and the trained image-token rows into the LLM weights, for inference."""
        if not self.cfg.lora.enabled:
            raise ValueError("merge_lora: this model has no LoRA adapter")
        self.llm = self.llm.merge_and_unload()
        self.cfg = dataclasses.replace(self.cfg, lora=dataclasses.replace(self.cfg.lora, enabled=False))
        self._llm_keys = list(self.llm.state_dict().keys())

    # -- use ------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "UnifiedModel":
        super().train(mode)
        self.vqrae.eval()  # frozen: its dropout/norm statistics never switch to training behaviour
        return self

    def image_codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """VQRAE code indices (any shape) -> token ids."""
        return self.vocab.to_tokens(codes)

    def ids_to_image_codes(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids of image codes (any shape) -> VQRAE code indices."""
        return self.vocab.to_codes(token_ids)

    @torch.no_grad()
    def tokenize_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> image-code token ids (B, N)."""
        return self.vocab.to_tokens(self.vqrae.tokenize(images.to(self._vqrae_dtype())))

    @torch.no_grad()
    def decode_image_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQRAE code indices (B, N) -> images (B, 3, H, W) in [-1, 1] scale."""
        return self.vqrae.decode_indices(codes)

    def project_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (M, 3, H, W) in [-1, 1] -> projected features (M, N, H)."""
        with torch.no_grad():
            features = self.vqrae.encode(images.to(self._vqrae_dtype()))  # (M, N, D)
        weight = self.projector.net[0].weight
        return self.projector(features.to(weight.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Input embeddings (B, L, H): token embeddings, with projected image features at ``image_mask``.

        The True positions of ``image_mask`` (B, L) are filled in row-major order by the M images' N features
        each: image 0's features at the first N True positions, image 1's at the next N, and so on.
        """
        if bool((input_ids < 0).any()):
            raise ValueError("input_ids hold negative ids: insert the image codes first (mllm.data.insert_codes)")
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, H)
        if self.image_positions is not None:
            embeds = embeds + self._code_positions(input_ids).to(embeds.dtype)
        if images is None and image_mask is None:
            return embeds
        if images is None or image_mask is None:
            raise ValueError("pass images and image_mask together")
        features = self.project_images(images)  # (M, N, H)
        slots, count = int(image_mask.sum()), features.shape[0] * features.shape[1]
        if slots != count:
            raise ValueError(
                f"image_mask marks {slots} positions but {features.shape[0]} images give {count} features "
                f"({features.shape[1]} each)"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
    ) -> UnifiedOutput:
        """Next-token logits (B, L, V) and, with ``labels`` (B, L; -100 = no loss), the shifted cross-entropy.

        A training forward (labels given, grad enabled) returns no logits: it runs the LLM's base model and
        applies the output layer at the labelled positions only, and the cross-entropy over the full vocabulary
        never holds an fp32 copy of the (positions x V) logits. A generation batch labels only its visual tokens,
        an understanding batch only its answers. LLMs whose logits are not their output layer on the last hidden
        state (soft-capped, rescaled) take the full forward.
        """
        embeds = self.embed(input_ids, images, image_mask)
        split = self._split_llm(embeds) if labels is not None and torch.is_grad_enabled() else None
        if split is None:
            logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
            if labels is None:
                return UnifiedOutput(logits=logits)
            targets = labels[:, 1:]  # position t predicts token t + 1
            ce = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            ).view_as(targets)
            return self._loss_terms(ce, targets, logits)
        body, head = split
        out = body(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # (B, L, H)
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        # The sampler draws only among code tokens inside an image, yet the loss stays the full-vocabulary
        # cross-entropy: equal to the full forward's, and it keeps text tokens unlikely at image positions.
        ce = labelled_cross_entropy(head(hidden[:, :-1][valid]), targets[valid])  # (n,)
        return self._loss_terms(ce, targets[valid], None)

    def _loss_terms(self, ce: torch.Tensor, targets: torch.Tensor, logits: Optional[torch.Tensor]) -> UnifiedOutput:
        """Mean cross-entropy ``ce`` (0 at unlabelled targets) over all, image and text ``targets`` of any shape."""
        valid = targets != IGNORE_INDEX
        image = valid & (self.vocab.is_code(targets) | (targets == self.vocab.eoi_id))
        text = valid & ~image
        return UnifiedOutput(
            logits=logits,
            loss=ce.sum() / valid.sum().clamp_min(1),
            image_loss=(ce * image).sum() / image.sum().clamp_min(1),
            text_loss=(ce * text).sum() / text.sum().clamp_min(1),
        )

    def _split_llm(self, embeds: torch.Tensor) -> Optional[tuple[nn.Module, nn.Module]]:
        """(base model, output layer) of the LLM when its logits are that layer on the base model's last hidden
        state, else None; checked once per LLM (``merge_lora`` replaces it) in the dtype of ``embeds``."""
        cached = getattr(self, "_llm_split", None)
        if cached is None or cached[0] is not self.llm:
            cached = self._llm_split = (self.llm, split_output_layer(self.llm, embeds))
        return cached[1]

    def _code_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, H): the ``image_positions`` row of each code token's index in its image, zero elsewhere.

        Code tokens are counted along each row; every image holds N of them, so the k-th code of a row is
        index k mod N of its image.
        """
        is_code = self.vocab.is_code(input_ids)
        index = (is_code.long().cumsum(dim=1) - 1).clamp_min(0) % self.vqrae.num_tokens
        return self.image_positions(index) * is_code.unsqueeze(-1)

    def sampling_config(self, seed: Optional[int] = None, **overrides) -> SamplingConfig:
        """This model's image sampling defaults (``cfg.sampling``) with ``overrides`` (e.g. ``cfg_scale=3``)."""
        return dataclasses.replace(self.cfg.sampling, seed=seed, **overrides)

    def image_position_table(self) -> Optional[torch.Tensor]:
        """The (N, H) table ``generate_image_codes(positions=...)`` adds to fed-back codes; None when off."""
        return None if self.image_positions is None else self.image_positions.weight

    def _vqrae_dtype(self) -> torch.dtype:
        return next(self.vqrae.parameters()).dtype


@torch.no_grad()
def split_output_layer(llm: nn.Module, like: torch.Tensor) -> Optional[tuple[nn.Module, nn.Module]]:
    """(base model, output layer) when ``llm``'s logits are exactly its output layer applied to its base model's
    last hidden state, so that layer may run on chosen positions alone; None for models that rescale or soft-cap
    their logits.

    Checked on one seeded random input embedding (dtype and device of ``like``), not on a batch's own: a zero
    padding row gives zero logits, which no soft cap changes. Eval mode keeps dropout (LoRA's) from making the
    two differ. A PEFT model is looked through to the transformers model it adapts in place; its wrapped output
    layer (trainable image-token rows) is called as the LLM calls it.
    """
    inner = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    head, body = inner.get_output_embeddings(), inner.base_model
    if head is None or body is inner:
        return None
    width = llm.get_input_embeddings().weight.shape[-1]
    probe = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(0)).to(like)
    training = llm.training
    llm.eval()
    try:
        full = llm(inputs_embeds=probe, use_cache=False).logits
        hidden = getattr(body(inputs_embeds=probe, use_cache=False), "last_hidden_state", None)
        same = hidden is not None and torch.equal(head(hidden), full)
    finally:
        llm.train(training)
    return (body, head) if same else None


def labelled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_elems: int = 2**26) -> torch.Tensor:
    """Per-row cross-entropy (n,) in fp32 of logits (n, V) of any float dtype against targets (n,).

    Equal to ``F.cross_entropy(logits.float(), targets, reduction="none")`` in value and gradient, without its
    fp32 copies of the whole (n, V) logits: rows are taken ``chunk_elems // V`` at a time (256 MiB of fp32).
    """
    return _CrossEntropy.apply(logits, targets, max(1, chunk_elems // logits.shape[-1]))


class _CrossEntropy(torch.autograd.Function):
    """Keeps only the logits (their own dtype) and the fp32 log-partition for backward, where the gradient
    softmax - onehot is formed chunk by chunk; autograd through ``F.cross_entropy(logits.float())`` keeps the
    fp32 log-probabilities of every row and makes (n, V) fp32 gradients on the way back."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        lse = torch.cat([part.float().logsumexp(dim=-1) for part in logits.split(rows)])  # (n,)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return lse - logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for r0 in range(0, logits.shape[0], ctx.rows):
            rows = slice(r0, r0 + ctx.rows)
            p = (logits[rows].float() - lse[rows, None]).exp_()  # softmax, (rows, V) fp32
            p.scatter_add_(1, targets[rows, None], p.new_full((p.shape[0], 1), -1.0))  # minus the one-hot target
            out[rows] = p.mul_(grad[rows, None])
        return out, None, None


_SAFETENSORS_HINT = ("only safetensors are loaded (use_safetensors=True): re-save the model with save_pretrained, "
                     "whose default is safetensors")


def _gguf(cfg: MLLMConfig) -> dict:
    return {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}


def _check_llm_source(cfg: MLLMConfig) -> None:
    """One-line errors for the ways ``cfg.llm`` / ``cfg.gguf_file`` go wrong before transformers' long ones."""
    llm = cfg.llm
    if os.path.isfile(llm) and llm.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(llm))
        raise ConfigError(f"model.llm '{llm}' is a GGUF file; name its folder and the file: "
                          f"model.llm={folder} model.gguf_file={name}")
    if not os.path.isdir(llm):
        return  # a hub id: transformers resolves it
    found = sorted(f for f in os.listdir(llm) if f.endswith(".gguf"))
    if cfg.gguf_file:
        if not os.path.isfile(os.path.join(llm, cfg.gguf_file)) and not os.path.isfile(cfg.gguf_file):
            raise ConfigError(f"model.gguf_file '{cfg.gguf_file}' is not in model.llm '{llm}'; GGUF files there: "
                              f"{', '.join(found) or 'none'}")
        return
    if found and not os.path.isfile(os.path.join(llm, "config.json")):
        raise ConfigError(f"model.llm '{llm}' holds only GGUF weights; set model.gguf_file to one of: {', '.join(found)}")
    if not cfg.trust_remote_code:
        refuse_remote_code(llm, "model.llm", "set model.trust_remote_code=true")
    refuse_pickled_weights(llm, "model.llm", _SAFETENSORS_HINT)


def _full_shape(weight: torch.Tensor) -> tuple:
    """A weight's shape, also when ZeRO-3 holds only a partition of it here (``ds_shape``)."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


def read_config(path: str) -> MLLMConfig:
    """The ``MLLMConfig`` saved in a ``save_pretrained`` directory."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        return from_dict(MLLMConfig, yaml.safe_load(f))


def _load_llm(source: str, cfg: MLLMConfig, trust_remote_code: bool, gguf: bool) -> PreTrainedModel:
    if cfg.dtype not in LLM_DTYPES:
        raise ValueError(f"MLLMConfig.dtype must be one of {', '.join(LLM_DTYPES)}, got '{cfg.dtype}'")
    if not (gguf and cfg.gguf_file):
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=LLM_DTYPES[cfg.dtype], trust_remote_code=trust_remote_code, use_safetensors=True
        )
    kwargs = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)  # plain tensors: trainable, savable
    except ImportError:  # older transformers always dequantise GGUF weights
        pass
    llm = AutoModelForCausalLM.from_pretrained(
        source, dtype=LLM_DTYPES[cfg.dtype], trust_remote_code=trust_remote_code, gguf_file=cfg.gguf_file, **kwargs
    )
    # transformers may still mark a GGUF-loaded model as quantized, and then refuses to save it. The weights
    # are ordinary tensors by now, so the model is an ordinary one.
    quantizer = getattr(llm, "hf_quantizer", None)
    if quantizer is not None:
        if getattr(quantizer, "packed_modules", None):
            raise ValueError(f"'{cfg.gguf_file}' loaded with packed GGUF weights, which cannot be trained")
        quantizer.remove_quantization_config(llm)
    return llm


def _with_lora(llm: PreTrainedModel, lora: LoraSettings, vocab: ImageVocab, adapter: Optional[str]) -> nn.Module:
    """Wrap ``llm`` in a PEFT LoRA model whose image-token rows (embedding and LM head) also train and save."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        refuse_pickled_weights(adapter, "LoRA adapter", "only adapter_model.safetensors is loaded: save the adapter "
                               "with save_pretrained, whose default is safetensors")
        return PeftModel.from_pretrained(llm, adapter, is_trainable=True)
    modules = dict((id(m), name) for name, m in llm.named_modules())
    ids = vocab.token_ids
    # Only the rows of the image tokens train (and are saved with the adapter); both matrices are named, and
    # peft ties the two row sets itself when the LLM ties its LM head to the embeddings.
    rows = {modules[id(llm.get_input_embeddings())]: ids}
    head = llm.get_output_embeddings()
    if head is not None:
        rows[modules[id(head)]] = ids
    targets = "all-linear" if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        trainable_token_indices=rows, task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, config)
