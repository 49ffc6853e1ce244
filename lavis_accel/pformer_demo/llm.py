"""The demo's frozen "LLM": a small OPT that has learned the synthetic captions' language from text alone.

BLIP-2 and P-Former lean on what a frozen LLM already knows: its language, and that text earlier in its context
tells it what comes next (prompts and queries work only through that). The offline hub's OPT is random, so the
demo first trains a small ``OPTForCausalLM`` as a causal LM on documents of text alone: one to ``DOCUMENT_CAPTIONS``
captions of one scene in different phrasings, each read as BLIP-2's OPT reads a caption (BLIP's caption cleaning,
``blip_caption``, then ``</s> caption \n``), one after the other. Every token after the first ``</s>`` is scored,
so the model learns the language and to use what the context already said about the scene; a caption of a
document's first scene is the text BLIP-2's queries and P-Former's prompts stand in for. It is saved as a local
Hugging Face folder (weights and the hub's OPT tokenizer), so LAVIS's ``blip2_opt`` and the plugin's
``pformer_opt`` / ``blip2_pformer_opt`` load it by path as ``opt_model``.
"""
import math
import os
import random

import torch

from lavis_accel.testing import hub

LLM_SIZE = {"hidden_size": 128, "word_embed_proj_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "ffn_dim": 512, "max_position_embeddings": 128}
LLM_BATCH = 32
DOCUMENT_CAPTIONS = 3
REPEAT_CHANCE = 0.5
LLM_WARMUP = 20


def clean(sentences):
    """The sentences as LAVIS's ``blip_caption`` text processor gives them to BLIP-2."""
    from lavis.common.registry import registry

    processor = registry.get_processor_class("blip_caption")()
    return [processor(sentence) for sentence in sentences]


def _document(tokenizer, phrasings, rng):
    """The token ids of one document about one scene: 1 to ``DOCUMENT_CAPTIONS`` captions, each
    ``</s> caption \\n``, each after the first repeating an earlier one word for word with chance
    ``REPEAT_CHANCE`` (quotes and repeated lines are common in text; they teach the model to copy from its
    context, which is how prompts steer it), else another phrasing of the scene."""
    chosen = [rng.choice(phrasings)]
    for _ in range(rng.randint(0, DOCUMENT_CAPTIONS - 1)):
        chosen.append(rng.choice(chosen) if rng.random() < REPEAT_CHANCE else rng.choice(phrasings))
    ids = []
    for caption in chosen:
        ids += tokenizer(caption + "\n").input_ids
    return ids


def _batches(tokenizer, scenes, steps, seed):
    """``steps`` seeded batches of documents (``(input_ids, attention_mask, labels)``, padding not scored)."""
    rng = random.Random(seed)
    for _ in range(steps):
        chosen = rng.sample(scenes, min(LLM_BATCH, len(scenes)))
        documents = [_document(tokenizer, phrasings, rng) for phrasings in chosen]
        width = max(map(len, documents))
        input_ids = torch.full((len(documents), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(documents), width), dtype=torch.long)
        for row, ids in enumerate(documents):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        yield input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100)


def train_llm(scenes, directory, steps, lr, seed, log=print):
    """Train the small OPT on documents of ``scenes`` (each a list of a scene's phrasings) for ``steps`` steps
    (AdamW, linear warm-up then cosine), save it and the tokenizer under ``directory``; return
    ``(directory, last loss)``."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(hub.TINY_OPT_REPO, use_fast=False)
    tokenizer.padding_side = "right"
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **LLM_SIZE)
    model = OPTForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    loss = float("nan")
    cleaned = [clean(phrasings) for phrasings in scenes]
    for step, (input_ids, attention_mask, labels) in enumerate(_batches(tokenizer, cleaned, steps, seed)):
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        schedule.step()
        loss = output.loss.item()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"toy OPT step {step + 1}/{steps}: LM loss {loss:.3f}")
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, loss


def _lr_factor(step, steps):
    if step < LLM_WARMUP:
        return (step + 1) / LLM_WARMUP
    progress = (step - LLM_WARMUP) / max(1, steps - LLM_WARMUP)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
