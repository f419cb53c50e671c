"""The backbone interface, and its adapter for `transformers`' LLaVA-1.5 layout (written against 5.x).

Everything that knows attribute paths, the decoder-layer call signature, rotary embeddings
and mask conventions of `LlavaForConditionalGeneration` lives here; the pruning modules and
the trainer only call the methods below. A new backbone family is a subclass in a file of its
own that overrides what differs (models/llava_next_backbone.py), listed in models/backbones.py,
whose ``load_backbone`` and ``read_backbone_shape`` pick the family from the checkpoint's
``model_type`` before any weight loads.

Facts this file relies on (transformers 5.x):
- ``model.model`` is a ``LlavaModel`` with ``.vision_tower`` (CLIP), ``.multi_modal_projector``
  and ``.language_model`` (a ``LlamaModel``: ``.embed_tokens``, ``.layers``, ``.norm``,
  ``.rotary_emb``); ``model.lm_head`` maps to the vocabulary.
- LLaVA reads vision features at ``vision_feature_layer`` and, with the ``default`` strategy,
  drops the CLS token; the projector maps them to the LLM width. The CLIP tower is flat
  (``.embeddings``, ``.pre_layrnorm``, ``.encoder.layers``; a layer is called as ``layer(hidden,
  None)``), so the layers after the selected one can be skipped.
- A decoder layer is called as ``layer(hidden, attention_mask=..., position_ids=...,
  position_embeddings=(cos, sin), use_cache=False)`` and returns the hidden states. A 4D float
  mask is used as given (SDPA does not add causality to it, so the mask must hold the
  causal triangle itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoProcessor, DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from models.box_tokens import Frame, covered, patch_rects
from models.flops import projector_flops, vision_tower_flops
from models.sequences import causal_padding_mask


class BackboneNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class BackboneShape:
    """What the config checks need, read from a LLaVA config without loading weights."""

    num_layers: int
    num_vision_tokens: int  # per image, after LLaVA's feature selection (576 for llava-1.5)
    image_size: int
    max_positions: int | None = None  # the language model's max_position_embeddings

    @classmethod
    def from_config(cls, config) -> "BackboneShape":
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        tokens = patches if config.vision_feature_select_strategy == "default" else patches + 1
        return cls(config.text_config.num_hidden_layers, tokens, vision.image_size,
                   getattr(config.text_config, "max_position_embeddings", None))


@dataclass
class ImageFeatures:
    """Pre-projector vision features of a batch, one image per sample."""

    features: torch.Tensor  # (B, N, Dv); a sample with fewer than N tokens is padded at the end
    valid: torch.Tensor | None = None  # (B, N) bool, False at the padding; None: every sample holds N


class LlavaBackbone(nn.Module):
    """A frozen (or, for the tiny builder, trainable) LLaVA model, exposed piece by piece."""

    model_type = "llava"  # config.json's model_type this family runs (models/backbones.py: FAMILIES)
    model_class = "LlavaForConditionalGeneration"  # the transformers class this family loads
    image_input_keys: tuple[str, ...] = ()  # processor outputs besides pixel_values that the vision path reads
    one_patch_grid = True  # the vision tokens are one image's patch grid, in order (pictures of what is kept)
    variable_token_count = False  # the number of vision tokens follows the image (num_vision_tokens: the most)

    def __init__(self, model: nn.Module, processor=None, freeze: bool = True):
        super().__init__()
        self.model = model
        self.processor = processor
        self.check_config(model.config)
        self.frozen = freeze
        self._token_rects = lru_cache(maxsize=256)(self.patch_boxes)  # per image size (width, height)
        if freeze:
            model.requires_grad_(False)
            model.eval()

    @staticmethod
    def check_config(config) -> None:
        """What this adapter cannot run, refused by name."""
        if isinstance(config.vision_feature_layer, (list, tuple)):
            raise NotImplementedError(
                "vision_feature_layer is a list: multi-layer vision features are not supported by the merger"
            )
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {config.vision_feature_select_strategy!r}")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen backbone stays in eval mode (no dropout) whatever the trainer asks
            self.model.eval()
        return self

    # ----- loading -----
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", attn_implementation: str = "sdpa",
                        device: str | torch.device = "cpu") -> "LlavaBackbone":
        """Load a checkpoint of this family from a local folder or the local Hugging Face cache, never the network
        (models/backbones.load_backbone picks the family from the checkpoint's config.json)."""
        kwargs = dict(local_files_only=True)
        try:
            model_type = AutoConfig.from_pretrained(name_or_path, **kwargs).model_type
            if model_type != cls.model_type:
                raise ValueError(f"{name_or_path!r} is a {model_type!r} model, not {cls.model_type!r}: load it with "
                                 "models.backbones.load_backbone, which picks the family from config.json")
            model = getattr(transformers, cls.model_class).from_pretrained(
                name_or_path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation, **kwargs
            )
            processor = cls.load_processor(name_or_path, **kwargs)
        except OSError as err:
            raise BackboneNotFoundError(missing_backbone_message(name_or_path, err)) from err
        return cls(model.to(device), processor, freeze=True)

    @staticmethod
    def load_processor(name_or_path: str, **kwargs):
        return AutoProcessor.from_pretrained(name_or_path, **kwargs)

    @staticmethod
    def shape_from_config(config) -> BackboneShape:
        return BackboneShape.from_config(config)

    @staticmethod
    def bound_config(config, max_vision_tokens: int | None, image_max_size: int | None) -> None:
        """Bound the vision tokens per image and the input resolution in ``config`` where the family lets the image
        decide them; LLaVA-1.5's are fixed (configs/schema.py checks them against the bounds instead)."""

    def apply_bounds(self, max_vision_tokens: int | None, image_max_size: int | None) -> None:
        """:meth:`bound_config` on this model's config and whatever the processor reads of it."""
        self.bound_config(self.config, max_vision_tokens, image_max_size)
        self._token_rects.cache_clear()

    # ----- relevance boxes -----
    def box_tokens(self, boxes, image_size: tuple[int, int]) -> torch.Tensor:
        """(N_i,) bool, in the order of the image's features: the vision tokens of an image of ``image_size`` (width,
        height) px that the ``boxes`` (each (x0, y0, x1, y1) in fractions of the image's width and height) cover, by
        models/box_tokens.covered."""
        return covered(self._token_rects(*image_size), torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4))

    def patch_boxes(self, width: int, height: int) -> torch.Tensor:
        """(N, 4) float64: for each vision token of a width x height image, the rectangle (x0, y0, x1, y1) of the
        original image, in fractions of its width and height, that its patch sees after the image processor's steps:
        LlavaImageProcessor's pad to a centred square (``do_pad``), the resize and the centre crop. With the ``full``
        strategy the CLS token comes first, as the whole image."""
        vision = self.config.vision_config
        frame, side = Frame(width, height), max(width, height)
        if getattr(self.processor.image_processor, "do_pad", False):  # pad_to_square, before the resize
            frame, width, height = frame.shifted((side - width) // 2, (side - height) // 2), side, side
        grid = vision.image_size // vision.patch_size
        rects = patch_rects(self._resize_and_crop(frame, height, width), grid, grid, vision.patch_size)
        if self.config.vision_feature_select_strategy == "full":
            rects = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64), rects])
        return rects

    def _resize_and_crop(self, frame: Frame, height: int, width: int) -> Frame:
        """``frame``, of a height x width px image, after the image processor's resize and centre crop."""
        processor = self.processor.image_processor
        if processor.do_resize:
            new_height, new_width = resized_size(processor.size, height, width)
            frame, height, width = frame.resized(new_width / width, new_height / height), new_height, new_width
        if processor.do_center_crop:
            crop = processor.crop_size
            frame = frame.shifted(-crop_offset(width, crop["width"]), -crop_offset(height, crop["height"]))
        return frame

    # ----- shapes -----
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def shape(self) -> BackboneShape:
        return self.shape_from_config(self.config)

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vision_hidden_size(self) -> int:
        return self.config.vision_config.hidden_size

    @property
    def num_vision_tokens(self) -> int:
        """Vision tokens per image after LLaVA's feature selection (576 for llava-1.5)."""
        return self.shape.num_vision_tokens

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encoder_flops(self, projected: int) -> int:
        """Multiply-adds of the vision tower on one image (the layers that run, CLS token included) and of the
        projector on ``projected`` tokens: what the LLM-only count (models/flops.llm_prefill_flops) leaves out."""
        vision = self.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        return (vision_tower_flops(tokens, vision.hidden_size, vision.intermediate_size, self.vision_layers_run)
                + projector_flops(projected, vision.hidden_size, self.hidden_size))

    # ----- pieces -----
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def vision_layers_run(self) -> int:
        """CLIP encoder layers up to the one whose output LLaVA reads (``vision_feature_layer``, -2 for llava-1.5):
        the layers after it are not run (stock LLaVA runs and discards them)."""
        layers = self.config.vision_config.num_hidden_layers
        return self.config.vision_feature_layer % (layers + 1)

    def _vision_hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """CLIP's hidden states up to the selected one: [embeddings after pre_layrnorm, output of layers[0], ...],
        indexed as the stock ``output_hidden_states`` (``hidden_states[i]`` is the output of ``layers[i - 1]``)."""
        tower = self.vision_tower
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(self.dtype)))  # (B, 1 + P, Dv)
        states = [hidden]
        for layer in tower.encoder.layers[:self.vision_layers_run]:
            hidden = layer(hidden, None)
            states.append(hidden)
        return states

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pre-projector vision features as LLaVA selects them: (B, N, Dv), N = num_vision_tokens."""
        return self._select_vision_tokens(self._vision_hidden_states(pixel_values)[-1])

    def _select_vision_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P, ...) -> (B, N, ...): LLaVA's ``vision_feature_select_strategy`` (``default`` drops CLS)."""
        return tokens[:, 1:] if self.config.vision_feature_select_strategy == "default" else tokens

    def vision_features_with_attention(self, pixel_values: torch.Tensor) -> "VisionAttention":
        """The features of :meth:`vision_features` and what the encoder layer that produced them attends with.

        CLIP's ``hidden_states[i]`` (i >= 1) is the output of ``encoder.layers[i - 1]``, and
        ``hidden_states[i - 1]`` its input; the CLS query's attention and the keys are recomputed from
        that input (layer_norm1, q/k projections, softmax(q k^T * scale)), which is what eager attention
        computes inside the layer, so the tower keeps running with SDPA. For llava-1.5 (feature layer -2)
        this is the penultimate layer's attention, the one VisionZip reads.
        """
        features, cls_attention, keys = self._vision_tokens_with_attention(pixel_values)
        return VisionAttention(features, cls_attention, keys)

    def _vision_tokens_with_attention(self, pixel_values: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (B, N, Dv), CLS attention (B, N), keys (B, N, Dv)) of each image of the tower (a crop)."""
        hidden_states = self._vision_hidden_states(pixel_values)
        index = len(hidden_states) - 1
        if index == 0:
            raise ValueError("vision_feature_layer selects the patch embeddings, which no attention layer produced")
        layer = self.vision_tower.encoder.layers[index - 1]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden_states[index - 1])  # (B, 1 + P, Dv), what the layer's attention reads
        B, T, _ = x.shape
        query = attn.q_proj(x[:, :1]).view(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, h, 1, hd)
        keys = attn.k_proj(x)  # (B, 1 + P, Dv)
        heads = keys.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, h, 1 + P, hd)
        probs = torch.softmax(query @ heads.transpose(2, 3) * attn.scale, dim=-1, dtype=torch.float32)  # (B, h, 1, 1 + P)
        cls_attention = probs.mean(dim=1)[:, 0]  # (B, 1 + P), mean over heads
        return (self._select_vision_tokens(hidden_states[index]), self._select_vision_tokens(cls_attention),
                self._select_vision_tokens(keys))

    # ----- the images' place in the sequence (what a family with another layout overrides) -----
    def image_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The processor outputs besides ``pixel_values`` that this family's vision path reads, on the device."""
        return {key: batch[key].to(self.device) for key in self.image_input_keys}

    def append_text(self, image_inputs: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
        """``image_inputs`` for the prompt followed by ``count`` more text tokens (per-token inputs grow)."""
        return image_inputs

    def image_features(self, pixel_values: torch.Tensor, **image_inputs) -> ImageFeatures:
        """The pre-projector features the merger reads, in the order of :meth:`feature_slots`."""
        return ImageFeatures(self.vision_features(pixel_values))

    def feature_slots(self, input_ids: torch.Tensor, **image_inputs) -> torch.Tensor:
        """(B, T) bool: the image placeholders that take a vision feature (all of them for LLaVA-1.5)."""
        return self.image_token_mask(input_ids)

    def embed_prompt(self, input_ids: torch.Tensor, **image_inputs) -> torch.Tensor:
        """(B, T, D) token embeddings, with any image structure that is not a vision feature in place (LLaVA-1.5:
        none); the feature slots are filled later."""
        return self.embed_tokens(input_ids)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) vision features -> (B, N, D) LLM-space embeddings."""
        return self.projector(features)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.image_token_id

    def merge_image_embeddings(self, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                               valid: torch.Tensor | None = None, **image_inputs) -> torch.Tensor:
        """Prompt embeddings with the feature slots replaced, in order, by ``image_embeds`` (B, N, D) (a sample's
        first ``valid.sum()`` of them when ``valid`` (B, N) is given)."""
        embeds = self.embed_prompt(input_ids, **image_inputs)  # (B, T, D)
        mask = self.feature_slots(input_ids, **image_inputs)  # (B, T)
        per_sample = mask.sum(dim=1)
        expected = valid.sum(dim=1) if valid is not None else torch.full_like(per_sample, image_embeds.shape[1])
        if not bool((per_sample == expected).all()):
            raise ValueError(
                f"image placeholders and image features do not match: placeholders per sample "
                f"{per_sample.tolist()}, features per sample {expected.tolist()}; "
                "the processor's patch_size / num_additional_image_tokens disagree with the model"
            )
        tokens = image_embeds if valid is None else image_embeds[valid]
        return embeds.masked_scatter(mask.unsqueeze(-1), tokens.to(embeds.dtype))

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for ``position_ids`` (B, T)."""
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def prompt_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **image_inputs) -> torch.Tensor:
        """(B, T) the rotary positions of a prompt: its columns, padding included, as the stock forward counts them.
        A pruned token keeps its position."""
        B, T = input_ids.shape
        return torch.arange(T, device=input_ids.device).expand(B, T)

    def next_positions(self, last_positions: torch.Tensor, step: int) -> torch.Tensor:
        """(B, 1) the rotary positions of the ``step``-th generated token after a prompt whose last token sits at
        ``last_positions`` (B,)."""
        return (last_positions + 1 + step)[:, None]

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor], cache=None) -> torch.Tensor:
        """Decoder layer ``index`` on (B, T, D) with a 4D additive mask (B, 1, T, S).

        With a ``cache`` (from :meth:`new_cache`) the layer appends its keys and values to its own
        cache layer and attends over everything cached there; each layer's cache can hold a
        different number of tokens, which is why the caller passes each layer's mask itself.
        """
        return self.layers[index](
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            cache=cache,
            use_cache=cache is not None,
        )

    def attention_probs(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
                        position_embeddings: tuple[torch.Tensor, torch.Tensor], query_index: torch.Tensor,
                        key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities (B, H, Q, T) of decoder layer ``index`` for the queries at ``query_index`` (B, Q).

        ``hidden`` (B, T, D) are the hidden states entering the layer, ``attention_mask`` (B, T) marks
        real tokens and ``position_embeddings`` are their (cos, sin). Recomputes what eager attention
        computes inside the layer (input norm, q/k projections, RoPE, grouped keys, causal and padding
        mask, softmax in float32) for the requested rows only, so the model keeps running with SDPA.
        Written against ``LlamaAttention`` (transformers 5.x), LLaVA-1.5's language model.
        """
        layer = self.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)  # (B, T, D)
        B, T, _ = x.shape
        Q = query_index.shape[1]
        rows = lambda t: t.gather(1, query_index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (B, T, C) -> (B, Q, C)
        cos, sin = position_embeddings  # (B, T, hd) each
        query = attn.q_proj(rows(x)).view(B, Q, -1, attn.head_dim).transpose(1, 2)  # (B, H, Q, hd)
        keys = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        query = apply_rotary_pos_emb(query, query, rows(cos), rows(sin))[0]
        keys = repeat_kv(apply_rotary_pos_emb(keys, keys, cos, sin)[1], attn.num_key_value_groups)  # (B, H, T, hd)
        scores = query @ keys.transpose(2, 3) * attn.scaling  # (B, H, Q, T)
        mask = causal_padding_mask(attention_mask, scores.dtype)  # (B, 1, T, T)
        mask = mask.gather(2, query_index[:, None, :, None].expand(-1, -1, -1, T))  # (B, 1, Q, T)
        if key_bias is not None:  # soft mode's log keep probabilities, as the layer itself adds them
            mask = mask + key_bias[:, None, None, :].to(mask.dtype)
        return torch.softmax(scores + mask, dim=-1, dtype=torch.float32)

    def new_cache(self):
        return DynamicCache(config=self.text_config)

    # ----- whole passes -----
    def decode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """All decoder layers and the final norm, unpruned: (B, T, D) -> (B, T, D)."""
        B, T, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=inputs_embeds.device).expand(B, T)
        mask = causal_padding_mask(attention_mask, inputs_embeds.dtype)
        cos_sin = self.rotary(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for i in range(self.num_layers):
            hidden = self.run_layer(i, hidden, mask, position_ids, cos_sin)
        return self.norm(hidden)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor,
                **image_inputs) -> torch.Tensor:
        """Unpruned logits (B, T, V), computed piece by piece; equals the stock forward."""
        images = self.image_features(pixel_values, **image_inputs)
        embeds = self.merge_image_embeddings(input_ids, self.project(images.features), images.valid, **image_inputs)
        positions = self.prompt_positions(input_ids, attention_mask, **image_inputs)
        return self.lm_head(self.decode(embeds, attention_mask, positions))

    def stock_generate(self, **inputs) -> torch.Tensor:
        """The stock ``generate`` of the unpruned model (the evaluation's baseline)."""
        return self.model.generate(**inputs)


@dataclass
class VisionAttention:
    """Vision features with what the encoder layer that produced them attends with (training-free mergers read it)."""

    features: torch.Tensor  # (B, N, Dv), as LlavaBackbone.vision_features returns them
    cls_attention: torch.Tensor  # (B, N) the CLS query's attention to each token, mean over heads
    keys: torch.Tensor  # (B, N, Dv) that layer's attention keys of each token, heads concatenated
    valid: torch.Tensor | None = None  # (B, N) bool, False at the padding of smaller images; None: none


def resized_size(size, height: int, width: int) -> tuple[int, int]:
    """The (height, width) that an image processor's resize to ``size`` gives a height x width image: a fixed size,
    or the shortest edge to ``shortest_edge`` and the other scaled and truncated (transformers'
    get_resize_output_image_size)."""
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    if size.get("shortest_edge") and not size.get("longest_edge"):
        short, long = sorted((height, width))
        scaled = int(size["shortest_edge"] * long / short)
        return (size["shortest_edge"], scaled) if height <= width else (scaled, size["shortest_edge"])
    raise NotImplementedError(f"relevance boxes: a resize to {dict(size)} is not mapped onto the vision tokens; give the "
                              "image processor a size of height and width, or of shortest_edge alone")


def crop_offset(length: int, crop: int) -> int:
    """Where a centre crop of ``crop`` px starts along a side of ``length`` px; before the side where the crop is
    larger, which zero-pads the side, centred with the extra pixel before it (the PIL backend's center_crop)."""
    return (length - crop) // 2 if length >= crop else -((crop - length + 1) // 2)


def missing_backbone_message(name_or_path: str, err: Exception) -> str:
    """One line: what was looked for, where, and the fix (a folder path gets no download advice: it is a path)."""
    where = Path(name_or_path).expanduser()
    cpu_default = "or run the embedded CPU default: python main.py --config configs/tiny.yaml"
    if where.is_dir():
        return (f"the backbone folder cannot be loaded: {err.__class__.__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''} ({where.resolve()}): give a folder written by "
                f"save_pretrained (config.json, weights, processor and tokenizer files), {cpu_default}")
    if where.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        return (f"no such backbone folder {name_or_path!r} ({where.resolve()}): point backbone_settings.name_or_path "
                f"at the folder of a llava-hf checkpoint, {cpu_default}")
    return (f"backbone {name_or_path!r} is not in the local Hugging Face cache (HF_HOME / ~/.cache/huggingface) and "
            "nothing is downloaded at run time (backbone_settings.name_or_path): download it once on a machine with "
            f"network access (hf download {name_or_path}) and point name_or_path at the folder, "
            f"{cpu_default}")
