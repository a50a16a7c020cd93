"""The BLIP model: a ViT, one MED text transformer in its three modes, and the task heads.

A task (`config.task`) only decides which parts exist:

| task      | parts                                                         | official class  |
|-----------|---------------------------------------------------------------|-----------------|
| pretrain  | ViT, text encoder, decoder (cross-attends the image), heads    | BLIP_Pretrain   |
| caption   | ViT, decoder                                                  | BLIP_Decoder    |
| retrieval | ViT, text encoder, projections, ITM head                      | BLIP_Retrieval  |
| vqa       | ViT, question encoder, answer decoder (cross-attends question) | BLIP_VQA        |
| feature   | ViT, text encoder                                             | BLIP_Base       |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BlipConfig
from .generation import GenerationConfig, generate
from .med import TextDecoder, TextTransformer, init_bert_weights
from .tokenizer import DEC_ID, ENC_ID, SEP_ID, as_texts, get_tokenizer, pre_caption, pre_question
from .transform import image_batches, prepare_images
from .vit import VisionTransformer

PARTS = {
    "pretrain": ("text_encoder", "text_decoder", "heads"),
    "caption": ("text_decoder",),
    "retrieval": ("text_encoder", "heads"),
    "vqa": ("text_encoder", "text_decoder"),
    "feature": ("text_encoder",),
}

_NEEDS = {
    "caption": ("captioning", "a captioning or pretrained checkpoint (e.g. model_base_caption_capfilt_large, "
                "Salesforce/blip-image-captioning-base)"),
    "match": ("image-text matching", "a retrieval or pretrained checkpoint (e.g. model_base_retrieval_coco, "
              "Salesforce/blip-itm-base-coco)"),
    "answer": ("visual question answering", "a VQA checkpoint (e.g. model_base_vqa_capfilt_large, "
               "Salesforce/blip-vqa-base)"),
    "text": ("text embedding", "a checkpoint with a text encoder (pretrained, retrieval, VQA or feature)"),
    "project": ("projected (ITC) embeddings", "a retrieval or pretrained checkpoint"),
}


class MissingPartError(ValueError):
    """The loaded checkpoint lacks the part a method needs."""


class ImageTextModule(nn.Module):
    """What every BLIP model (Blip, BlipNLVR) shares: a `visual_encoder`, a `config`, and where they live."""

    @property
    def device(self) -> torch.device:
        return self.visual_encoder.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_encoder.cls_token.dtype

    @property
    def text_dtype(self) -> torch.dtype:
        """The text side's dtype: it may differ from the ViT's (dtype="bf16")."""
        for name in ("text_encoder", "text_decoder"):
            if hasattr(self, name):
                return next(getattr(self, name).parameters()).dtype
        return self.dtype

    def has(self, *parts: str) -> bool:
        return all(hasattr(self, p) for p in parts)

    def pixels(self, images) -> torch.Tensor:
        """Paths / PIL images / bytes, or an already-normalised (B, 3, H, W) tensor -> model input."""
        return prepare_images(images, self.config.vision.image_size, device=self.device, dtype=self.dtype)


class Blip(ImageTextModule):
    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        parts = PARTS[config.task]
        self.visual_encoder = VisionTransformer(config.vision)
        if "text_encoder" in parts:
            self.text_encoder = TextTransformer(config.text, cross_width=config.cross_width)
        if "text_decoder" in parts:
            cross = config.text.width if config.task == "vqa" else config.cross_width
            self.text_decoder = TextDecoder(config.text, cross_width=cross)
        if "heads" in parts:
            self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
            self.text_proj = nn.Linear(config.text.width, config.embed_dim)
            self.itm_head = nn.Linear(config.text.width, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
        for name in ("text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"):
            if hasattr(self, name):
                init_bert_weights(getattr(self, name))
        self.tokenizer = get_tokenizer()

    # ----------------------------------------------------------------- plumbing
    def _require(self, need: str, ok: bool) -> None:
        if not ok:
            what, kind = _NEEDS[need]
            raise MissingPartError(f"{what} needs {kind}; this model is a '{self.config.task}' checkpoint")

    def _texts(self, texts, max_length: int, first_token: int | None, clean=pre_caption):
        texts = [clean(t) for t in as_texts(texts)]
        ids, mask = self.tokenizer(texts, max_length=max_length, first_token=first_token)
        return ids.to(self.device), mask.to(self.device)

    # ----------------------------------------------------------------- features
    @torch.inference_mode()
    def encode_image(self, images) -> torch.Tensor:
        """All ViT tokens (B, 1+N, vision width), in the text side's dtype."""
        return self.visual_encoder(self.pixels(images)).to(self.text_dtype)

    @torch.inference_mode()
    def embed_images(self, images, project: bool | None = None) -> torch.Tensor:
        """One vector per image: the L2-normalised ITC embedding when the model has projection
        heads (project=None or True), else the raw [CLS] token of the ViT."""
        project = self.has("vision_proj") if project is None else project
        self._require("project", not project or self.has("vision_proj"))
        cls = self.encode_image(images)[:, 0]
        return F.normalize(self.vision_proj(cls).float(), dim=-1) if project else cls

    @torch.inference_mode()
    def embed_texts(self, texts, project: bool | None = None, max_length: int = 35) -> torch.Tensor:
        """One vector per text from the unimodal encoder ([CLS] first): the normalised ITC embedding,
        or the raw [CLS] state without projection heads."""
        self._require("text", self.has("text_encoder"))
        project = self.has("text_proj") if project is None else project
        self._require("project", not project or self.has("text_proj"))
        ids, mask = self._texts(texts, max_length, None)
        cls = self.text_encoder(ids, mask, mode="text")[:, 0]
        return F.normalize(self.text_proj(cls).float(), dim=-1) if project else cls

    @torch.inference_mode()
    def embed_multimodal(self, images, texts, max_length: int = 35) -> torch.Tensor:
        """The image-grounded encoder's [ENC] state (B, text width) for image-text pairs."""
        self._require("text", self.has("text_encoder"))
        image_states = self.encode_image(images)
        ids, mask = self._texts(texts, max_length, ENC_ID)
        image_states = _pair(image_states, ids.shape[0])
        return self.text_encoder(ids, mask, image_states, mode="multimodal")[:, 0]

    # ----------------------------------------------------------------- matching
    def itm_logits(self, image_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM head on the multimodal encoder's first token; image_states (G, S, D) with the text rows
        grouped per image (rows = G * K)."""
        self._require("match", self.has("text_encoder", "itm_head"))
        hidden = self.text_encoder(input_ids, attention_mask, image_states, mode="multimodal")
        return self.itm_head(hidden[:, 0])

    def itc_similarity(self, image_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cosine of the projected [CLS] features, (images, texts)."""
        self._require("match", self.has("text_encoder", "vision_proj"))
        img = F.normalize(self.vision_proj(image_states[:, 0]).float(), dim=-1)
        txt = F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask, mode="text")[:, 0]).float(), dim=-1)
        return img @ txt.t()

    @torch.inference_mode()
    def match(self, images, texts, first_token: str = "enc", max_length: int = 35) -> dict[str, torch.Tensor]:
        """Image-text matching. One image against K texts, or N images paired with N texts.

        Returns {"itm": P(match) from the ITM head, "itc": cosine of the ITC embeddings}, each (K,).
        first_token="enc" puts [ENC] first as official training and retrieval do; "cls" keeps [CLS]
        as the official `blip_itm.py` demo and transformers do.
        """
        self._require("match", self.has("text_encoder", "itm_head"))
        if first_token not in ("enc", "cls"):
            raise ValueError("first_token must be 'enc' or 'cls'")
        texts = as_texts(texts)
        image_states = self.encode_image(images)
        n = image_states.shape[0]
        if n != 1 and n != len(texts):
            raise ValueError(f"got {n} images and {len(texts)} texts: give one image, or one text per image")
        ids, mask = self._texts(texts, max_length, None)
        itc = self.itc_similarity(image_states, ids, mask)
        itc = itc[0] if n == 1 else itc.diagonal()
        if first_token == "enc":
            ids = ids.clone()
            ids[:, 0] = ENC_ID
        itm = self.itm_logits(image_states, ids, mask).float().softmax(-1)[:, 1]
        return {"itm": itm, "itc": itc}

    # ----------------------------------------------------------------- captioning
    def prompt_ids(self, prompt: str, batch: int) -> torch.Tensor:
        """`[DEC] prompt tokens` without the closing [SEP], as the official decoder is fed."""
        ids = self.tokenizer.encode(prompt)[:-1]
        ids[0] = DEC_ID
        return torch.tensor([ids] * batch, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def generate_ids(self, images, *, prompt: str | None = None, num_beams: int = 3, max_length: int = 20,
                     min_length: int = 5, sample: bool = False, top_p: float = 0.9, top_k: int = 50,
                     repetition_penalty: float | None = None, length_normalization: str = "full",
                     generator: torch.Generator | list[torch.Generator] | None = None,
                     num_return_sequences: int = 1) -> tuple[torch.Tensor, int]:
        """Token ids (B * num_return_sequences, L) including the prompt, and the prompt length. max/min
        length count the prompt, as in the official code (transformers 4.15). num_return_sequences > 1
        (sampling only) draws that many captions per image, image i owning rows [i*n, (i+1)*n), all
        sharing one copy of its cross-attention inputs; generator may be a list with one per row."""
        self._require("caption", self.has("text_decoder") and self.config.task != "vqa")
        n = num_return_sequences
        if not isinstance(n, int) or n < 1 or (n > 1 and not sample):
            raise ValueError(f"num_return_sequences must be 1, or > 1 with sample=True; got {n!r}")
        image_states = self.encode_image(images)
        b = image_states.shape[0]
        prompt = self.config.prompt if prompt is None else prompt
        input_ids = self.prompt_ids(prompt, b * n)
        if repetition_penalty is None:
            repetition_penalty = 1.1 if sample else 1.0  # the official sampling path hard-codes 1.1
        cfg = GenerationConfig(num_beams=1 if sample else num_beams, max_length=max_length, min_length=min_length,
                               do_sample=sample, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                               length_normalization=length_normalization, eos_token_id=SEP_ID, pad_token_id=0)
        absorb = self.text_decoder.absorb_pays(cfg.num_beams * n, max_length - input_ids.shape[1])
        state = self.text_decoder.start(image_states, absorb=absorb)
        if n > 1:
            state.reorder(torch.arange(b, device=self.device).repeat_interleave(n), groups=b)
        ids = generate(state, input_ids, cfg, generator=generator)
        return ids, input_ids.shape[1]

    def caption(self, images, *, batch_size: int = 16, return_ids: bool = False, progress: bool = False,
                workers: int | None = None, **kwargs):
        """Captions for paths / PIL images / a normalised tensor. kwargs: prompt, num_beams (3),
        max_length (20), min_length (5), sample, top_p (0.9), top_k, repetition_penalty,
        length_normalization ("full" = official, "generated" = current transformers), generator.
        Images decode in `workers` threads (default: up to 8; 0: none) while the previous batch runs.
        Returns strings, or dicts {"caption", "ids"} with return_ids."""
        total = len(_as_batch(images))
        batches = image_batches(images, self.config.vision.image_size, batch_size, workers=workers)
        out = []
        for chunk in _progress(batches, progress, total, batch_size):
            ids, plen = self.generate_ids(chunk, **kwargs)
            for row in ids:
                gen = row[plen:]
                text = self.tokenizer.decode(gen)
                out.append({"caption": text, "ids": row[row != 0].tolist()} if return_ids else text)
        return out

    # ----------------------------------------------------------------- VQA
    def _question_states(self, images, questions, max_length: int = 35):
        self._require("answer", self.config.task == "vqa")
        questions = as_texts(questions)
        image_states = self.encode_image(images)
        if image_states.shape[0] != len(questions):
            if image_states.shape[0] != 1:
                raise ValueError("give one question per image, or one image for all questions")
        ids, mask = self._texts(questions, max_length, ENC_ID, clean=pre_question)
        image_states = _pair(image_states, ids.shape[0])
        states = self.text_encoder(ids, mask, image_states, mode="multimodal")
        return states, mask

    @torch.inference_mode()
    def answer(self, images, questions, answer_list: list[str] | None = None, *, k_test: int = 128,
               num_beams: int = 3, max_length: int = 10, min_length: int = 1, length_normalization: str = "full") -> list[str]:
        """Answers: generated (beam search from [DEC]) or, with answer_list, ranked as the official
        `rank_answer` does (top-k candidates by first-token probability, then the highest
        label-smoothed sequence log-likelihood). The decoder masks question padding, unlike the
        official code, so an answer does not depend on its batch-mates."""
        states, mask = self._question_states(images, questions)
        if answer_list is not None:
            return self._rank_answers(states, mask, answer_list, k_test)
        cfg = GenerationConfig(num_beams=num_beams, max_length=max_length, min_length=min_length,
                               length_normalization=length_normalization, eos_token_id=SEP_ID, pad_token_id=0)
        bos = torch.full((states.shape[0], 1), DEC_ID, dtype=torch.long, device=self.device)
        absorb = self.text_decoder.absorb_pays(num_beams, max_length - 1)
        ids = generate(self.text_decoder.start(states, mask, absorb=absorb), bos, cfg)
        return [self.tokenizer.decode(row[1:]) for row in ids]

    def _rank_answers(self, states, mask, answer_list, k_test):
        if not answer_list:
            raise ValueError("answer_list is empty")
        ans_ids, ans_mask = self.tokenizer(list(answer_list), first_token=DEC_ID)
        ans_ids, ans_mask = ans_ids.to(self.device), ans_mask.to(self.device)
        q = states.shape[0]
        k = min(k_test, len(answer_list))
        first = self.text_decoder(ans_ids[:1, :1].expand(q, 1), None, states, mask)[:, 0].float()
        probs = first.softmax(-1).index_select(1, ans_ids[:, 1])
        top_probs, top_ids = probs.topk(k, dim=1)
        cand_ids, cand_mask = ans_ids[top_ids.flatten()], ans_mask[top_ids.flatten()]
        # question i owns candidate rows [i*k, (i+1)*k): the decoder shares its question states
        nll = self.text_decoder.lm_loss(cand_ids, cand_mask, states, mask,
                                        label_smoothing=self.config.label_smoothing, reduction="none")
        best = (-nll).view(q, k).argmax(1)
        return [answer_list[i] for i in top_ids[torch.arange(q), best].tolist()]


def _pair(image_states: torch.Tensor, rows: int) -> torch.Tensor:
    """One image for many texts stays one group; N images for N texts pair up."""
    if image_states.shape[0] in (1, rows):
        return image_states
    raise ValueError(f"got {image_states.shape[0]} images and {rows} texts: give one image, or one text per image")


def _as_batch(images):
    if isinstance(images, torch.Tensor):
        return images if images.ndim == 4 else images.unsqueeze(0)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _progress(it, enabled: bool, total_items: int, batch_size: int):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, total=-(-total_items // batch_size), unit="batch", desc=f"{total_items} images", leave=False)
