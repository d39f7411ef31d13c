"""
Checkpoints: written atomically, read with torch.load(weights_only=True), and turned back into a model.
Also reads checkpoints written by nanoGPT's train.py (vocabulary from that data folder's meta.pkl).
"""

import os
from dataclasses import asdict

import torch

from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from tokenizer import read_meta

MODELS = {'gpt': (GPT, GPTConfig), 'efficient': (EfficientGPT, EfficientGPTConfig)}


class CheckpointError(ValueError):
    pass


def save_checkpoint(ckpt, path):
    """Write to a temporary file, then rename over path: an interrupted write leaves the old file whole."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location='cpu'):
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line})") from e
    missing = [k for k in ('model', 'model_args') if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not an EfficientGPT or nanoGPT checkpoint: it has no {', '.join(missing)}")
    return ckpt


def model_state(model):
    """State dict of the bare model (without torch.compile's or DDP's wrappers)."""
    return {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in model.state_dict().items()}


def model_checkpoint(model, meta):
    """The part of a checkpoint that rebuilds a model: weights, type, args and vocabulary."""
    model_type = 'efficient' if isinstance(model, EfficientGPT) else 'gpt'
    return dict(model=model_state(model), model_type=model_type, model_args=asdict(model.config), meta=meta)


def build_model(model_type, model_args):
    if model_type not in MODELS:
        raise CheckpointError(f"unknown model_type {model_type!r}; known: {', '.join(MODELS)}")
    model_cls, config_cls = MODELS[model_type]
    try:
        return model_cls(config_cls(**model_args))
    except TypeError as e:
        raise CheckpointError(f"model_args do not fit {config_cls.__name__}: {e}") from e


def model_from_checkpoint(ckpt, data_root='data'):
    """(model, meta) from a loaded checkpoint. A nanoGPT checkpoint has no model_type and no meta: it is
    a GPT, and its vocabulary comes from data_root/<its dataset>/meta.pkl (or meta.json)."""
    model = build_model(ckpt.get('model_type', 'gpt'), ckpt['model_args'])
    # torch.compile'd models save '_orig_mod.' prefixes; nanoGPT without flash attention saves the mask
    state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items() if not k.endswith('.attn.bias')}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model they describe: {e}") from e
    meta = ckpt.get('meta')
    if meta is None:
        dataset = ckpt.get('config', {}).get('dataset')
        if dataset is None:
            raise CheckpointError("checkpoint has no vocabulary (meta) and names no dataset to read one from")
        # nanoGPT's convention: a dataset without meta.pkl is GPT-2 BPE
        meta = read_meta(os.path.join(data_root, dataset)) or {'tokenizer': 'gpt2', 'vocab_size': 50257}
    return model, meta
