"""The pruned forward: token merger before the projector, layer pruners inside the language model.

``PrunedLlava`` runs the frozen backbone's pieces itself (through the adapter,
models/llava_backbone.py) so that a pruner can act before any chosen decoder layer.

- Merging: the N vision features become K merged tokens (models/token_merger.py); each sits
  in its centre's placeholder slot, the other placeholders leave the sequence.
- Soft mode (training): each vision token j carries a cumulative keep probability m_j (the
  product over the stages it passed), accumulated in float32 log space as a sum of
  log-sigmoids (models/gumbel.gumbel_log_sigmoid); every later layer adds log(m_j) to the
  attention logits towards key j, unclamped, so a token with m_j -> 0 stops being seen even by
  a trained model's sharp attention: in the limit soft mode equals hard mode
  (tests/test_pruned_llava.py checks it on the shipped trained backbone). The sequence length
  stays fixed and gradients reach every m_j.
- Hard mode (inference): at each pruning layer the top-k vision tokens by keep logit stay;
  hidden states, position ids and masks are gathered, so later layers run on shorter
  sequences.
- Samples may hold different numbers of vision tokens (an adaptive merger's K per image, or a
  backbone whose token count follows the image): every gather is batched (``compact``), a
  shorter row is padded with masked-out slots, and each stage keeps the same share of every
  sample's tokens (the stage budgets are counts for a sample with the reference number of
  merged tokens, scaled to each sample's own count).
- Proportional attention (``merge_proportional_attention``): a merged token that stands for s
  vision tokens adds log s to every attention logit towards it, so the language model attends to
  it as to its s parts (ToMe's proportional attention); with ``fold_pruned``
  (``pruner_proportional_attention``) the tokens a stage drops pass their weight to the kept
  tokens most like them (``fold_weights``), in both modes alike. The attention mass over the
  image is then kept through every stage; without it, every dropped token takes its share away.
- Text tokens are never pruned; every token keeps its original position id (RoPE positions
  do not shift), in both modes.
- Token counts are read off the tensors as they pass each layer.
- Training-free baselines (models/baselines/) take the merger's or a pruner's place and run
  through the same hard path; rankers such as FastV read attention probabilities on request
  (``AttentionProbe``) while the model keeps running with SDPA.

With no merger and no pruners the logits equal the stock ``LlavaForConditionalGeneration``
forward (tests/test_pruned_llava.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.gumbel import gumbel_log_sigmoid
from models.llava_backbone import LlavaBackbone
from models.sequences import IGNORE_INDEX, causal_padding_mask, compact, key_padding_mask
from models.token_merger import MergeOutput, TokenMerger

DEAD_LOGIT = -1e4  # keep logit of an unused vision slot: ranked last in hard mode, log-keep ~ -1e4 / tau in soft mode
FOLD_TEMPERATURE = 0.02  # of the softmax over cosine similarity that sends a dropped token's weight to kept ones
NEVER = -1e9  # a log weight that is exactly zero after exp, finite so that sums and gradients stay finite


def fold_weights(vision: torch.Tensor, log_weight: torch.Tensor, log_stay: torch.Tensor, log_leave: torch.Tensor,
                 log_receive: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """A stage that keeps the attention mass of the tokens it drops (``pruner_proportional_attention``).

    Token j (hidden state ``vision`` (B, n, D), attention weight w_j = exp(``log_weight``), (B, n)) keeps q_j of its
    weight (``log_stay`` = log q_j) and passes the rest (``log_leave`` = log(1 - q_j)) to the tokens that survive the
    stage, in proportion to r_k exp(cos(h_j, h_k) / FOLD_TEMPERATURE), r_k (``log_receive``) a token's keep after
    the stage: w'_k = q_k w_k + sum_j (1 - q_j) w_j a_jk. In log space, float32, so a token that hard mode drops
    (q ~ 0) stays exactly as suppressed as without folding; with q and r in {0, 1} (hard mode, or soft mode in the
    limit) the dropped tokens' weight goes to the kept ones most like them. ``alive`` (B, n): real tokens.
    Returns (B, n) the new log weights. Costs n x n x D multiply-adds (:func:`models.flops.fold_flops`).
    """
    h = torch.nn.functional.normalize(vision.float(), dim=-1)
    logits = (h @ h.transpose(1, 2)) / FOLD_TEMPERATURE + log_receive[:, None, :]  # (B, from, to)
    log_a = logits.masked_fill(~alive[:, None, :], NEVER).log_softmax(dim=-1)
    log_out = (log_leave + log_weight).masked_fill(~alive, NEVER)  # (B, n) the weight each token gives away
    log_in = torch.logsumexp(log_out[:, :, None] + log_a, dim=1)  # (B, n) what each receives
    return torch.logaddexp(log_stay + log_weight, log_in)


@dataclass
class PrunedOutput:
    hidden: torch.Tensor | None  # (B, T', D) after the final norm
    logits: torch.Tensor | None  # (B, T', V)
    attention_mask: torch.Tensor | None  # (B, T') of the final sequence
    labels: torch.Tensor | None  # (B, T') labels gathered like the sequence
    merge: MergeOutput | None
    stage_keep_probs: list[torch.Tensor] = field(default_factory=list)  # soft: (B, n) cumulative m per stage
    stage_logits: list[torch.Tensor] = field(default_factory=list)  # soft: (B, n) each stage's keep logits
    stage_positions: list[torch.Tensor] = field(default_factory=list)  # soft: (B, n) their original sequence positions
    vision_counts: list[torch.Tensor] = field(default_factory=list)  # per decoder layer: (B,) real vision tokens entering it
    seq_len_per_layer: list[int] = field(default_factory=list)
    pruner_sparsity_losses: list[torch.Tensor] = field(default_factory=list)
    layer_attention_masks: list[torch.Tensor] = field(default_factory=list)  # (B, T_l) keys each layer saw
    layer_key_bias: list[torch.Tensor | None] = field(default_factory=list)  # (B, T_l) float32 what each layer added to
    #   its attention logits towards each key (log sizes, soft mode's log keep), None: nothing
    vision_attention: torch.Tensor | None = None  # (B, n) with record_attention: see PrunedLlava.forward
    question_counts: torch.Tensor | None = None  # (B,) question tokens the merger and pruners read
    image_tokens: torch.Tensor | None = None  # (B,) each image's vision tokens before the merger
    last_positions: torch.Tensor | None = None  # (B,) or (B, R) the rotary positions of the last prompt token
    kept_positions: list[torch.Tensor] = field(default_factory=list)  # hard: (B, k) sequence positions of the vision
    #   tokens entering the LLM, then after each stage (-1 at the padding of a sample with fewer)
    prefill_seconds: float | None = None  # wall-clock seconds of this pass, when the caller timed it (evaluation)

    @property
    def vision_tokens_per_layer(self) -> list[float]:
        """Vision tokens entering each decoder layer, the batch mean of the counts read off the tensors."""
        return [counts.float().mean().item() for counts in self.vision_counts]


@dataclass
class _Sequence:
    """The running sequence and everything gathered along with it."""

    hidden: torch.Tensor  # (B, T, D)
    index: torch.Tensor  # (B, T) each token's column in the prompt
    position_ids: torch.Tensor  # (B, T) or (B, T, R) its rotary positions, as the backbone's rotary reads them
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    question_mask: torch.Tensor  # (B, T) bool, the question's text tokens
    is_vision: torch.Tensor  # (B, T) bool
    labels: torch.Tensor | None  # (B, T)
    log_size: torch.Tensor | None = None  # (B, T) float32 log of the tokens each one stands for (proportional
    #   attention: added to every attention logit towards it; 0 for text), None: every token stands for itself

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> "_Sequence":
        """The tokens at ``index`` (B, T'); where ``valid`` (B, T') is False, a masked-out padding slot."""
        def take(x: torch.Tensor | None) -> torch.Tensor | None:  # (B, T, ...) -> (B, T', ...)
            if x is None:
                return None
            return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))

        return _Sequence(
            take(self.hidden), take(self.index),
            take(self.position_ids), take(self.attention_mask) * valid, take(self.question_mask) & valid,
            take(self.is_vision) & valid,
            None if self.labels is None else take(self.labels).masked_fill(~valid, IGNORE_INDEX),
            take(self.log_size),
        )

    def key_bias(self, log_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, T) float32 what the attention adds to its logits towards each key: soft mode's ``log_weight`` (log of
        keep probability times size), else the log sizes; None when neither is there."""
        return self.log_size if log_weight is None else log_weight

    def layer_mask(self, log_weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, T, T) the decoder layers' additive mask: causal and padding, plus :meth:`key_bias`."""
        bias = self.key_bias(log_weight)
        if bias is None:
            return causal_padding_mask(self.attention_mask, self.hidden.dtype)
        return soft_keep_mask(self.attention_mask, bias, self.hidden.dtype)

    # Cached: the masks of a sequence never change (a stage builds a new sequence), only its hidden states do.
    @cached_property
    def vision_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n) sequence positions of the vision tokens and (B, n) bool: False where a sample holds fewer than n
        (those slots point at other tokens and must be ignored)."""
        return compact(self.is_vision)

    @property
    def vision_index(self) -> torch.Tensor:
        return self.vision_slots[0]

    def vision_hidden(self) -> torch.Tensor:
        """(B, n, D) the hidden states at :attr:`vision_index`."""
        return self.hidden.gather(1, self.vision_index.unsqueeze(-1).expand(-1, -1, self.hidden.shape[-1]))

    @cached_property
    def vision_alive(self) -> torch.Tensor:
        """(B, n) bool: the slot holds a real vision token (valid and not masked out)."""
        index, valid = self.vision_slots
        return valid & self.attention_mask.gather(1, index).bool()

    @cached_property
    def vision_counts(self) -> torch.Tensor:
        """(B,) real vision tokens per sample (slots that are not masked out)."""
        return (self.is_vision & self.attention_mask.bool()).sum(dim=1)


@dataclass
class AttentionProbe:
    """The attention probabilities a decoder layer computes on the current sequence, on request.

    Holds the hidden states entering the layers that can be probed at a pruning layer (that layer
    and the one before it); ``probe(layer, query_index)`` -> (B, H, Q, T) through the adapter
    (LlavaBackbone.attention_probs), so the model itself keeps running with SDPA.
    """

    backbone: LlavaBackbone
    layer_inputs: dict[int, torch.Tensor]  # layer -> (B, T, D) hidden states entering it
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of the sequence's positions
    key_bias: torch.Tensor | None = None  # (B, T) what the layers add to the logits towards each key (log sizes)

    def __call__(self, layer: int, query_index: torch.Tensor) -> torch.Tensor:
        if layer not in self.layer_inputs:
            raise ValueError(f"decoder layer {layer} cannot be probed here; only layers {sorted(self.layer_inputs)} "
                             "(the pruning layer and the one before it)")
        return self.backbone.attention_probs(layer, self.layer_inputs[layer], self.attention_mask,
                                             self.position_embeddings, query_index, key_bias=self.key_bias)


class _AnswerAttention:
    """The teacher's importance of each vision token: attention from the last instruction token, summed over layers."""

    def __init__(self, backbone: LlavaBackbone, seq: _Sequence):
        self.backbone = backbone
        self.query = last_question_token(seq)  # (B, 1)
        self.total = 0.0

    def add(self, layer: int, seq: _Sequence, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> None:
        probs = self.backbone.attention_probs(layer, seq.hidden, seq.attention_mask, cos_sin, self.query,
                                              key_bias=seq.key_bias())  # (B, H, 1, T)
        self.total = self.total + probs.mean(dim=1)[:, 0].gather(1, seq.vision_index) * seq.vision_alive  # (B, n)

    def result(self) -> torch.Tensor:
        """(B, n) averaged over heads and layers, normalised over the vision tokens."""
        return self.total / self.total.sum(dim=1, keepdim=True)


def last_question_token(seq: _Sequence) -> torch.Tensor:
    """(B, 1) the sequence slot of each sample's last question token (the one that predicts the answer)."""
    columns = torch.arange(seq.hidden.shape[1], device=seq.hidden.device)
    return (seq.question_mask.long() * columns).argmax(dim=1, keepdim=True)


def vision_positions(seq: _Sequence) -> torch.Tensor:
    """(B, n) original sequence positions of the vision slots, -1 at a shorter sample's padding slots."""
    index, valid = seq.vision_slots
    return seq.index.gather(1, index).masked_fill(~valid, -1)


def question_tokens(hidden: torch.Tensor, question_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The question's tokens of each sample, in order and left-aligned: (B, Tq, D) and their (B, Tq) bool mask,
    Tq the longest question of the batch. The merger and the pruners attend to these, not to the whole sequence."""
    counts = question_mask.sum(dim=1)  # (B,)
    width = max(1, int(counts.max()))
    order = question_mask.int().sort(dim=1, descending=True, stable=True).indices[:, :width]  # (B, Tq)
    tokens = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return tokens, torch.arange(width, device=hidden.device) < counts.unsqueeze(1)


def soft_keep_mask(attention_mask: torch.Tensor, log_keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal and padding, plus log m_j on every query's logit towards key j.

    ``log_keep`` may also hold log sizes (proportional attention, :meth:`_Sequence.key_bias`).
    Built in float32 and clamped to ``dtype``'s range: a dropped token's log m_j (about -logit / tau,
    thousands for a confident pruner) stays far below the 60-140 by which a trained model's attention
    logits differ, so soft mode with m_j -> 0 equals hard mode's removal (a floor such as log(1e-6)
    would not).
    """
    return with_key_bias(causal_padding_mask(attention_mask, torch.float32), log_keep, dtype)


def with_key_bias(mask: torch.Tensor, key_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 additive mask (B, 1, Q, T) plus ``key_bias`` (B, T) on every query's logit towards key j, clamped to
    ``dtype``'s range and cast to it."""
    return (mask + key_bias[:, None, None, :]).clamp_min(torch.finfo(dtype).min).to(dtype)


def scaled_budgets(budget: int, reference: int, entering: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """(B,) tokens a stage keeps per sample: ``budget`` for a sample that entered the LLM with ``reference`` vision
    tokens, the same share of what each sample entered with (``entering``, (B,)) otherwise; rounded, at least 1 and
    at most the ``available`` (B,) tokens it still holds."""
    share = torch.round(entering.double() * budget / reference).long()
    return torch.minimum(share.clamp_min(1), available.clamp_min(1))


def question_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: real text tokens after the image and before the answer (the answer must not leak to pruners)."""
    is_image = input_ids == image_token_id
    after_image = (is_image.long().cumsum(dim=1) == is_image.sum(dim=1, keepdim=True)) & ~is_image
    mask = after_image & attention_mask.bool()
    if labels is not None:
        mask &= labels == IGNORE_INDEX
    return mask


class PrunedLlava(nn.Module):
    """A frozen LLaVA backbone with an optional token merger and layer pruners before ``pruning_layers``."""

    def __init__(self, backbone: LlavaBackbone, merger: TokenMerger | None = None,
                 pruners: nn.ModuleList | None = None, pruning_layers: list[int] = (),
                 stage_budgets: list[int] = (), fold_pruned: bool = False, temperature: float = 1.0):
        super().__init__()
        pruners = pruners if pruners is not None else nn.ModuleList()
        if not (len(pruners) == len(pruning_layers) == len(stage_budgets)):
            raise ValueError(f"{len(pruners)} pruners, {len(pruning_layers)} pruning layers and "
                             f"{len(stage_budgets)} stage budgets must match")
        bad = [layer for layer in pruning_layers if not 0 <= layer < backbone.num_layers]
        if bad:
            raise ValueError(f"pruning layers {bad} outside 0..{backbone.num_layers - 1}")
        self.backbone = backbone
        self.merger = merger
        self.pruners = pruners
        self.stage_of_layer = {layer: s for s, layer in enumerate(pruning_layers)}
        self.stage_budgets = list(stage_budgets)
        # The merger's and pruners' temperature when a call gives none: a trained model's is the one its training
        # ended at (the merger's soft assignment at 1.0 would not be the merging it learned).
        self.temperature = temperature
        self.fold_pruned = fold_pruned  # the pruners' dropped tokens leave their attention weight (fold_weights)
        self.gradient_checkpointing = False  # recompute each decoder layer in backward (GPU memory)

    @property
    def merged_tokens(self) -> int:
        """Vision tokens the merger aims for (all N without a merger): the reference of the stages' soft targets."""
        return self.merger.num_keep if self.merger is not None else self.backbone.num_vision_tokens

    # ------------------------------------------------------------------ building the sequence
    def _initial_sequence(self, input_ids, pixel_values, attention_mask, labels, tau, generator, image_inputs):
        bb = self.backbone
        merger_inputs = {}
        with torch.no_grad():  # the backbone is frozen
            if getattr(self.merger, "reads_vision_attention", False):  # training-free mergers (models/baselines)
                merger_inputs["vision_attention"] = bb.vision_features_with_attention(pixel_values, **image_inputs)
                features, valid = merger_inputs["vision_attention"].features, merger_inputs["vision_attention"].valid
            else:
                images = bb.image_features(pixel_values, **image_inputs)
                features, valid = images.features, images.valid  # (B, N, Dv), (B, N) | None
        if valid is not None:
            merger_inputs["valid"] = valid
        question_mask = question_token_mask(input_ids, attention_mask, bb.image_token_id, labels)
        embeds = bb.embed_prompt(input_ids, **image_inputs)  # (B, T, D)
        is_feature = bb.feature_slots(input_ids, **image_inputs)  # (B, T) placeholders that take a feature
        image_slots, slot_valid = compact(is_feature)  # (B, N)
        B, N = features.shape[:2]
        counts = valid.sum(dim=1) if valid is not None else torch.full((B,), N, device=features.device)  # (B,)
        if image_slots.shape[1] != features.shape[1] or not bool((slot_valid.sum(1) == counts).all()):
            raise ValueError(f"image placeholders and image features do not match: {slot_valid.sum(1).tolist()} "
                             f"placeholders per sample, {counts.tolist()} features")
        merge, alive = None, valid  # alive: (B, K) the slots that hold a token
        if self.merger is not None:
            question, in_question = question_tokens(embeds, question_mask)  # (B, Tq, D), (B, Tq)
            if getattr(self.merger, "reads_question_ids", False):  # a CLIP text tower reads the instruction's text
                merger_inputs["question_ids"] = question_tokens(input_ids[..., None], question_mask)[0][..., 0]
            merge = self.merger(features, tau, question=question, question_mask=in_question, generator=generator,
                                **merger_inputs)
            vision, kept, alive = merge.tokens, merge.positions, merge.valid  # (B, K, Dv), (B, K), (B, K) | None
        else:
            vision = features
            kept = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
        kept_slots = image_slots.gather(1, kept)  # (B, K), distinct per row
        alive = torch.ones_like(kept_slots, dtype=torch.bool) if alive is None else alive
        index = kept_slots.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        projected = bb.project(vision).to(embeds.dtype)  # (B, K, D)
        embeds = embeds.scatter(1, index, torch.where(alive.unsqueeze(-1), projected, embeds.gather(1, index)))
        is_vision = torch.zeros_like(is_feature).scatter(1, kept_slots, alive)  # unused slots leave the sequence
        B, T = input_ids.shape
        log_size = None
        if merge is not None and merge.sizes is not None:  # proportional attention: a merged token counts as its size
            log_size = torch.zeros((B, T), device=embeds.device).scatter(1, kept_slots, merge.sizes.float().clamp_min(1).log())
        full = _Sequence(embeds, torch.arange(T, device=input_ids.device).expand(B, T),
                         bb.prompt_positions(input_ids, attention_mask, **image_inputs), attention_mask,
                         question_mask, is_vision, labels, log_size)
        return full.gather(*compact(~is_feature | is_vision, right=True)), merge, counts

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, mode: str = "soft", tau: float | None = None,
                generator: torch.Generator | None = None, cache=None, record_attention: bool = False,
                image_inputs: dict | None = None) -> PrunedOutput:
        """Soft (``mode="soft"``) or hard (``"hard"``) pruned forward. Noise only in training mode.

        ``labels`` (B, T) mark the answer (not IGNORE_INDEX): those tokens are not question tokens
        for the pruners. ``record_attention``: also return ``vision_attention`` (B, n), the attention
        the last instruction token (the one that predicts the answer) pays to each vision token,
        averaged over heads and decoder layers and normalised over the vision tokens: the teacher's
        importance of each token, the merger's and pruners' training target. ``image_inputs``: what the
        backbone's vision path reads besides the pixels (``backbone.image_inputs(batch)``; LLaVA-NeXT's image sizes).
        ``tau``: the merger's and pruners' temperature (None: the model's :attr:`temperature`).
        """
        self._check_call(mode, record_attention)
        tau = self.temperature if tau is None else tau
        bb = self.backbone
        seq, merge, image_tokens = self._initial_sequence(input_ids, pixel_values, attention_mask, labels, tau,
                                                          generator, image_inputs or {})
        stats = PrunedOutput(hidden=None, logits=None, attention_mask=None, labels=None, merge=merge,
                             image_tokens=image_tokens)  # filled below
        mask = seq.layer_mask()
        cos_sin = bb.rotary(seq.hidden, seq.position_ids)
        log_keep = torch.zeros(seq.hidden.shape[:2], device=seq.hidden.device)  # soft: (B, T) float32 log m_j
        # soft: (B, T) log of m_j times the token's size, what the attention adds (with folding, more than the sum)
        log_weight = log_keep if seq.log_size is None else seq.log_size
        entering = seq.vision_counts  # (B,) vision tokens each sample brings into the LLM
        if mode == "hard":
            stats.kept_positions.append(vision_positions(seq))
        previous_input = None  # the hidden states that entered the previous layer (same tokens as seq)
        recorder = _AnswerAttention(bb, seq) if record_attention else None

        for layer in range(bb.num_layers):
            if layer in self.stage_of_layer:
                stage = self.stage_of_layer[layer]
                logits = self._keep_logits(stage, layer, seq, cos_sin, previous_input,
                                           log_weight if mode == "soft" else None)  # (B, n)
                if mode == "hard":
                    seq = self._drop(seq, logits, self.stage_budgets[stage], entering)
                    stats.kept_positions.append(vision_positions(seq))
                    mask = seq.layer_mask()
                    cos_sin = bb.rotary(seq.hidden, seq.position_ids)
                else:
                    log_keep, log_weight = self._soft_keep(stage, seq, logits, log_keep, log_weight, tau, generator,
                                                           stats)
                    mask = seq.layer_mask(log_weight)
            stats.vision_counts.append(seq.vision_counts)
            stats.seq_len_per_layer.append(seq.hidden.shape[1])
            stats.layer_attention_masks.append(seq.attention_mask)
            stats.layer_key_bias.append(seq.key_bias(log_weight if mode == "soft" else None))
            previous_input = seq.hidden
            if recorder is not None:
                recorder.add(layer, seq, cos_sin)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                seq.hidden = checkpoint(bb.run_layer, layer, seq.hidden, mask, seq.position_ids, cos_sin,
                                        use_reentrant=False)
            else:
                seq.hidden = bb.run_layer(layer, seq.hidden, mask, seq.position_ids, cos_sin, cache=cache)

        stats.question_counts = seq.question_mask.sum(dim=1)
        stats.last_positions = seq.position_ids[:, -1]
        stats.hidden = bb.norm(seq.hidden)
        stats.logits = bb.lm_head(stats.hidden)
        stats.attention_mask, stats.labels = seq.attention_mask, seq.labels
        if recorder is not None:
            stats.vision_attention = recorder.result()
        return stats

    def _check_call(self, mode: str, record_attention: bool) -> None:
        if mode not in ("soft", "hard"):
            raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
        if record_attention and (self.merger is not None or len(self.pruners)):
            raise ValueError("record_attention reads the unpruned model's attention: call it on a PrunedLlava "
                             "without merger and pruners (the trainer's teacher)")
        if mode == "soft" and any(getattr(p, "reads_attention", False) for p in self.pruners):
            raise ValueError("attention-ranking pruners (FastV, PyramidDrop) are training-free: run them with mode='hard'")

    def _keep_logits(self, stage: int, layer: int, seq: _Sequence, cos_sin: tuple[torch.Tensor, torch.Tensor],
                     previous_input: torch.Tensor | None, log_weight: torch.Tensor | None) -> torch.Tensor:
        """The stage's keep logits (B, n) for the vision tokens at ``seq.vision_index``; unused slots get the lowest.
        ``log_weight``: soft mode's (B, T) log weights so far (what the previous layer's attention added)."""
        pruner = self.pruners[stage]
        vision_index = seq.vision_index  # (B, n)
        if getattr(pruner, "reads_attention", False):
            # Training-free rankers (models/baselines) read the attention of this layer or of the one before it.
            inputs = {layer: seq.hidden} if previous_input is None else {layer: seq.hidden, layer - 1: previous_input}
            probe = AttentionProbe(self.backbone, inputs, seq.attention_mask, cos_sin, seq.key_bias())
            logits = pruner(probe, layer, seq.attention_mask, vision_index)
        else:
            vision = seq.vision_hidden()  # (B, n, D)
            extra = []
            if getattr(pruner, "reads_received_attention", False):
                extra.append(self._received_attention(layer, seq, cos_sin, previous_input, log_weight))
            logits = pruner(vision, *question_tokens(seq.hidden, seq.question_mask), *extra)
        return logits.masked_fill(~seq.vision_alive, DEAD_LOGIT)

    def _received_attention(self, layer: int, seq: _Sequence, cos_sin: tuple[torch.Tensor, torch.Tensor],
                            previous_input: torch.Tensor | None, log_weight: torch.Tensor | None) -> torch.Tensor:
        """(B, n) the attention the last question token paid each vision token in decoder layer ``layer - 1``
        (mean over heads; in soft mode with the log weights that layer added), 0 at padding slots."""
        if previous_input is None:
            raise ValueError(f"an attention-aware pruner reads the layer before its own; layer {layer} has none")
        probs = self.backbone.attention_probs(layer - 1, previous_input, seq.attention_mask, cos_sin,
                                              last_question_token(seq),
                                              key_bias=seq.key_bias(log_weight))  # (B, H, 1, T)
        return probs.mean(dim=1)[:, 0].gather(1, seq.vision_index) * seq.vision_alive  # (B, n)

    def _drop(self, seq: _Sequence, logits: torch.Tensor, budget: int, entering: torch.Tensor) -> _Sequence:
        """Hard mode: each sample keeps its share of the vision tokens (``budget`` for one that entered the LLM with
        the reference count, see :func:`scaled_budgets`) with the largest keep logits; the sequence shrinks."""
        vision_index = seq.vision_index  # (B, n)
        keep = scaled_budgets(budget, self.merged_tokens, entering, seq.vision_alive.sum(dim=1))  # (B,)
        width = int(keep.max())
        ranked = logits.topk(width, dim=-1).indices  # (B, width), best first; padding slots rank last
        take = torch.arange(width, device=logits.device) < keep.unsqueeze(1)  # (B, width) each sample's first k_b
        kept = torch.zeros_like(seq.is_vision).scatter(1, vision_index.gather(1, ranked), take)
        if self.fold_pruned:
            seq = self._fold_hard(seq, kept.gather(1, vision_index))
        return seq.gather(*compact(~seq.is_vision | kept, right=True))

    def _fold_hard(self, seq: _Sequence, stays: torch.Tensor) -> _Sequence:
        """Hard mode's :func:`fold_weights`: the vision tokens that leave (``stays`` (B, n) False) give their weight to
        the kept ones most like them; returns the sequence with the new log sizes (text tokens keep 0)."""
        vision_index, alive = seq.vision_index, seq.vision_alive
        log_size = seq.log_size if seq.log_size is not None else torch.zeros(seq.hidden.shape[:2],
                                                                             device=seq.hidden.device)
        yes, no = torch.zeros_like(stays, dtype=torch.float32), torch.full_like(stays, NEVER, dtype=torch.float32)
        stay, leave = torch.where(stays, yes, no), torch.where(stays, no, yes)
        folded = fold_weights(seq.vision_hidden(), log_size.gather(1, vision_index), stay, leave, stay, alive)
        log_size = log_size.scatter(1, vision_index, torch.where(stays & alive, folded, log_size.gather(1, vision_index)))
        return dataclasses.replace(seq, log_size=log_size)

    def _soft_keep(self, stage: int, seq: _Sequence, logits: torch.Tensor, log_keep: torch.Tensor,
                   log_weight: torch.Tensor, tau: float, generator: torch.Generator | None,
                   stats: PrunedOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft mode: log m_j += log q_j for the stage's keep gate q_j (a Gumbel-sigmoid, in log space), and the log
        weights the attention adds (each token's times q_j, or :func:`fold_weights`); records what the losses read."""
        vision_index, valid = seq.vision_slots  # (B, n)
        log_q, log_not_q = gumbel_log_sigmoid(logits, tau, noise=self.training, generator=generator,
                                              with_complement=True)  # (B, n) float32
        log_keep = log_keep.scatter_add(1, vision_index, log_q.masked_fill(~valid, 0.0))  # padding slots add nothing
        if self.fold_pruned:
            before = log_weight.gather(1, vision_index)  # (B, n)
            folded = fold_weights(seq.vision_hidden(), before, log_q, log_not_q, log_keep.gather(1, vision_index),
                                  seq.vision_alive)
            log_weight = log_weight.scatter(1, vision_index, torch.where(valid, folded, before))
        else:
            log_weight = log_weight.scatter_add(1, vision_index, log_q.masked_fill(~valid, 0.0))
        cumulative = log_keep.gather(1, vision_index).exp() * valid  # (B, n) m_j
        alive = seq.vision_alive.to(cumulative.dtype)  # (B, n)
        target = self.stage_budgets[stage] / self.merged_tokens
        stats.stage_keep_probs.append(cumulative)
        stats.stage_logits.append(logits)
        stats.stage_positions.append(vision_positions(seq))
        stats.pruner_sparsity_losses.append(((cumulative * alive).sum() / alive.sum() - target) ** 2)
        return log_keep, log_weight

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, eos_token_id: int, pad_token_id: int, mode: str = "hard",
                 image_inputs: dict | None = None, tau: float | None = None) -> tuple[torch.Tensor, PrunedOutput]:
        """Greedy answers (B, <= max_new_tokens) after a pruned prefill; decoding reads each layer's KV cache."""
        prefill, cache = self.prefill(input_ids, pixel_values, attention_mask, mode, image_inputs, tau)
        return self.decode(prefill, cache, max_new_tokens, eos_token_id, pad_token_id), prefill

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor,
                mode: str = "hard", image_inputs: dict | None = None,
                tau: float | None = None) -> tuple[PrunedOutput, object]:
        """The pruned prompt pass that fills a new KV cache: (its output, the cache) for :meth:`decode`."""
        cache = self.backbone.new_cache()
        return self.forward(input_ids, pixel_values, attention_mask, mode=mode, tau=tau, cache=cache,
                            image_inputs=image_inputs), cache

    @torch.no_grad()
    def decode(self, prefill: PrunedOutput, cache, max_new_tokens: int, eos_token_id: int,
               pad_token_id: int, return_scores: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens (B, <= max_new_tokens) after :meth:`prefill`; with ``return_scores`` also (B, steps, V) the
        logits that followed each generated token (the last step's follow the last token)."""
        bb = self.backbone
        token = prefill.logits[:, -1].argmax(-1)  # (B,)
        done = torch.zeros_like(token, dtype=torch.bool)
        key_masks = list(prefill.layer_attention_masks)  # per layer: its cached keys, 1 = real
        key_bias = list(prefill.layer_key_bias) or [None] * bb.num_layers  # per layer: what its logits add per key
        generated, scores = [], []
        for step in range(max_new_tokens):
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            generated.append(token)
            done |= token == eos_token_id
            if bool(done.all()) or (step == max_new_tokens - 1 and not return_scores):
                break
            hidden = bb.embed_tokens(token[:, None])  # (B, 1, D)
            position_ids = bb.next_positions(prefill.last_positions, step)  # the prompt's positions continue
            cos_sin = bb.rotary(hidden, position_ids)
            for layer in range(bb.num_layers):
                key_masks[layer] = torch.cat([key_masks[layer], torch.ones_like(key_masks[layer][:, :1])], dim=1)
                if key_bias[layer] is None:
                    mask = key_padding_mask(key_masks[layer], hidden.dtype)  # (B, 1, 1, S): the new token sees all real keys
                else:  # a new token stands for itself
                    key_bias[layer] = torch.cat([key_bias[layer], key_bias[layer].new_zeros(key_bias[layer].shape[0], 1)], 1)
                    mask = with_key_bias(key_padding_mask(key_masks[layer], torch.float32), key_bias[layer], hidden.dtype)
                hidden = bb.run_layer(layer, hidden, mask, position_ids, cos_sin, cache=cache)
            logits = bb.lm_head(bb.norm(hidden))[:, -1]  # (B, V)
            scores.append(logits)
            token = logits.argmax(-1)
        if return_scores:
            return torch.stack(generated, dim=1), torch.stack(scores, dim=1)
        return torch.stack(generated, dim=1)
