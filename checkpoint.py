"""
Checkpoints: written atomically, read with torch.load(weights_only=True), and turned back into a model.
Also reads checkpoints written by nanoGPT's train.py (vocabulary from that data folder's meta.pkl).
"""

import errno
import os
import pickle
import re
from dataclasses import asdict, fields

import torch

from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from tokenizer import read_meta

MODELS = {'gpt': (GPT, GPTConfig), 'efficient': (EfficientGPT, EfficientGPTConfig)}


class CheckpointError(ValueError):
    pass


def _write_failure(e):
    """Why a checkpoint write failed, in words: the OSError's errno when there is one (torch's zip writer wraps
    it in a RuntimeError such as 'unexpected pos 6007040 vs 6006932', keeping the OSError as its context)."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    code = getattr(cause, 'errno', None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if code == errno.EFBIG:
        return "the file would exceed the largest file this process may write (ulimit -f)"
    if cause is not None:
        return f"{cause.strerror or cause}"
    if 'unexpected pos' in str(e) or 'write failed' in str(e):
        return "the write stopped short (is the disk full?)"
    return _first_line(e)


def save_checkpoint(ckpt, path):
    """Write to a temporary file, flush it to disk, then rename it over path: an interrupted or failed write
    leaves the old file whole. A failed write is a CheckpointError that says why and that the old file stands."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        kept = "the previous checkpoint there is intact" if os.path.exists(path) else "no checkpoint was there before"
        raise CheckpointError(f"could not write {path}: {_write_failure(e)}; {kept}") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _not_ours(e):
    """Why torch.load refused a file, without torch's advice to load it with weights_only=False (never do
    that with a file you did not write: it runs whatever code the file holds)."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a {found.group(1)} object, which checkpoints never contain"
    if isinstance(e, (pickle.UnpicklingError, EOFError)) or 'zip archive' in text or 'central directory' in text:
        return "it is not a file torch.save wrote, or it was cut short"
    first = text.strip().splitlines()[0] if text.strip() else ''
    return f"{type(e).__name__}: {first}" if 'weights_only' not in first else "torch cannot read it safely"


def load_checkpoint(path, map_location='cpu'):
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a checkpoint this project wrote, nor a nanoGPT one: {_not_ours(e)}") from None
    missing = [k for k in ('model', 'model_args') if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint this project wrote, nor a nanoGPT one: "
                              f"it has no {', '.join(missing)}")
    return ckpt


def model_state(model):
    """State dict of the bare model (without torch.compile's or DDP's wrappers)."""
    return {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in model.state_dict().items()}


def model_checkpoint(model, meta):
    """The part of a checkpoint that rebuilds a model: weights, type, args and vocabulary."""
    model_type = 'efficient' if isinstance(model, EfficientGPT) else 'gpt'
    return dict(model=model_state(model), model_type=model_type, model_args=asdict(model.config), meta=meta)


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_config(model_type, model_args):
    """The config dataclass of a model type, checked: any error it raises is a one-line CheckpointError."""
    if model_type not in MODELS:
        raise CheckpointError(f"unknown model_type {model_type!r}; known: {', '.join(MODELS)}")
    config_cls = MODELS[model_type][1]
    try:
        return config_cls(**model_args)
    except TypeError as e:
        raise CheckpointError(f"model_args do not fit {config_cls.__name__}: {_first_line(e)}") from None
    except (ValueError, AssertionError) as e:
        raise CheckpointError(f"model config: {_first_line(e)}") from None


def build_model(model_type, model_args):
    """The model of a type and its args. A config the model cannot be built from (a bad layer pattern, n_embd
    not divisible by n_head, ...) is a one-line CheckpointError, never a traceback."""
    config = model_config(model_type, model_args)
    try:
        return MODELS[model_type][0](config)
    except (ValueError, AssertionError) as e:
        raise CheckpointError(f"model config: {_first_line(e)}") from None


def model_from_checkpoint(ckpt, data_root='data'):
    """(model, meta) from a loaded checkpoint. A nanoGPT checkpoint has no model_type and no meta: it is
    a GPT, and its vocabulary comes from data_root/<its dataset>/meta.pkl (or meta.json)."""
    model = build_model(ckpt.get('model_type', 'gpt'), ckpt['model_args'])
    # torch.compile'd models save '_orig_mod.' prefixes; nanoGPT without flash attention saves the mask
    state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items() if not k.endswith('.attn.bias')}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model they describe: {_first_line(e)}") from e
    meta = ckpt.get('meta')
    if meta is None:
        dataset = ckpt.get('config', {}).get('dataset')
        if dataset is None:
            raise CheckpointError("checkpoint has no vocabulary (meta) and names no dataset to read one from")
        # nanoGPT's convention: a dataset without meta.pkl is GPT-2 BPE
        meta = read_meta(os.path.join(data_root, dataset)) or {'tokenizer': 'gpt2', 'vocab_size': 50257}
    return model, meta


PRETRAINED = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # OpenAI's GPT-2 on the Hugging Face hub
# transformers' GPT-2 stores these as Conv1D, (in, out): a Linear's weight is their transpose
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def is_pretrained(source):
    """Whether init_from names pretrained GPT-2 weights: a hub name, or 'hf:<folder>' saved by transformers."""
    return source in PRETRAINED or source.startswith('hf:')


def from_pretrained(source, model_type='gpt', **changes):
    """(model, meta) of GPT-2 weights from transformers (nanoGPT's from_pretrained): a hub name of PRETRAINED,
    or 'hf:<folder>' holding a GPT2LMHeadModel saved with save_pretrained. The parameter names are nanoGPT's,
    so the weights load into a GPT or into an EfficientGPT; changes are model args over GPT-2's (dropout, a
    smaller block_size, mechanism keys: the parameters a mechanism adds keep their own initialisation)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise CheckpointError(f"init_from={source!r} needs transformers: pip install -e '.[hf]'") from None
    name = source.removeprefix('hf:')
    try:
        hf = GPT2LMHeadModel.from_pretrained(name)
    except Exception as e:  # a missing folder, no network to the hub, a file that is not GPT-2
        raise CheckpointError(f"could not load GPT-2 weights {name!r} ({type(e).__name__}: {_first_line(e)})") from None
    c = hf.config
    if c.activation_function not in ('gelu_new', 'gelu_pytorch_tanh', 'gelu'):
        raise CheckpointError(f"{name!r} uses activation {c.activation_function!r}; GPT-2's is gelu_new")
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions, vocab_size=c.vocab_size,
                bias=True, dropout=0.0, mlp_act='gelu' if c.activation_function == 'gelu' else 'gelu_tanh')
    args.update(changes)
    if args['block_size'] > c.n_positions:
        raise CheckpointError(f"block_size {args['block_size']} is longer than {name!r}'s {c.n_positions} positions")
    model = build_model(model_type, args)
    state = {k: v.t() if k.endswith(CONV1D) else v for k, v in hf.state_dict().items()
             if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
    state['transformer.wpe.weight'] = state['transformer.wpe.weight'][:args['block_size']]  # a shorter context
    load_with_additions(model, state, repr(name), model_type)
    return model, {'tokenizer': 'gpt2', 'vocab_size': 50257}


def load_with_additions(model, state, name, model_type):
    """Load state into model, whose mechanisms may add parameters that state lacks (they keep their own
    initialisation); a weight of state the model has no place for, or of another shape, is an error."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape differs
        raise CheckpointError(f"{name} does not fit a {model_type} model: {_first_line(e)}") from None
    added = {k for k in model.state_dict() if k not in state}  # a mechanism's own parameters
    if unexpected or set(missing) != added:
        raise CheckpointError(f"{name} does not fit a {model_type} model: unexpected {unexpected[:3]}, "
                              f"missing {sorted(set(missing) - added)[:3]}")


# keys that give a checkpoint's weights their meaning: a run that starts from them keeps the checkpoint's values
# (GPTConfig's fields but dropout, and the EfficientGPT keys that change what existing weights compute)
WEIGHTS_OWN = tuple(f.name for f in fields(GPTConfig) if f.name != 'dropout') + \
    ('pos_emb', 'rope_base', 'qk_norm', 'tie_embeddings', 'logit_softcap')


def from_checkpoint_weights(path, model_type='efficient', **changes):
    """(model, meta) of a trained checkpoint's weights in a new model of its sizes, e.g. a dense model that
    gains exit heads (LayerSkip's continued training) or another mechanism: changes are model args over the
    checkpoint's (dropout, mechanism keys); the parameters a mechanism adds keep their own initialisation.
    A change to a key in WEIGHTS_OWN is an error naming it."""
    ckpt = load_checkpoint(path)
    source_type, args = ckpt.get('model_type', 'gpt'), ckpt['model_args']
    if source_type == 'efficient' and model_type == 'gpt':
        raise CheckpointError(f"{path} holds an efficient model: continue it with model_type='efficient'")
    was = {**{f.name: f.default for f in fields(EfficientGPTConfig)}, **args}  # a GPT's args lack the efficient keys
    own = [f"{k} {was[k]!r} -> {v!r}" for k, v in changes.items() if k in WEIGHTS_OWN and v != was[k]]
    if own:
        raise CheckpointError(f"{', '.join(own)}: the checkpoint's own with init_from='ckpt:{path}' (only dropout "
                              f"and mechanism keys may change)")
    keys = {f.name for f in fields(MODELS[model_type][1])}
    model = build_model(model_type, {k: v for k, v in {**args, **changes}.items() if k in keys})
    state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items() if not k.endswith('.attn.bias')}
    load_with_additions(model, state, path, model_type)
    return model, ckpt.get('meta')
