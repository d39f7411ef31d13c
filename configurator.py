"""
Strict configurator: config files and --key=value overrides on top of a script's defaults.
Same command line as nanoGPT's exec-style configurator, but it is a function you call, and
a typo'd key or a wrongly typed value is an error instead of a silently ignored new global.
$ python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
"""
import ast
import difflib
import os
import re
import sys
import traceback
import types

class ConfigError(ValueError):
    pass

def _unknown_key(key, known, source):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean: {', '.join(close)}?" if close else "no similar keys, see --help for all of them"
    return ConfigError(f"unknown config key '{key}' in {source}; {hint}")

def _check(key, value, default, source):
    """Return value, type-checked against the default (ints are promoted to floats)."""
    if default is None:
        return value  # no default type to check against
    want = type(default)
    # bool is a subclass of int, so compare exact types rather than isinstance
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        raise ConfigError(f"config key '{key}' expects {want.__name__}, got {value!r} "
                          f"({type(value).__name__}) from {source}")
    return value

def load_config_file(path, namespace=None):
    """Exec a Python config file on top of namespace; return the settings it leaves behind. A file may start
    from another one beside it with include('other.py'), e.g. a headline file from its size file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    ns = dict(namespace or {})
    ns['include'] = lambda name: ns.update(load_config_file(os.path.join(os.path.dirname(path), name), ns))
    with open(path) as f:
        source = f.read()
    try:
        exec(compile(source, path, 'exec'), ns)
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:  # a NameError, a failed import: name the file's line, not the configurator's
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), '?')
        raise ConfigError(f"{path}, line {line}: {type(e).__name__}: {e}") from None
    # imports, helper functions and _private names are the file's own business, not settings
    return {k: v for k, v in ns.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType) and not callable(v)}

# `key = value  # text`, `key: type = value  # text` (a dataclass field) or `key=value,  # text` (a dict entry)
_COMMENTED = re.compile(r"^\s*(\w+)\s*(?::[^=]+)?=[^#]*#\s*(.+)$")

def describe(*paths):
    """{key: its one-line description}, read from the comment beside each default in these source files:
    the defaults block is the documentation, so --help never drifts from it."""
    text = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                m = _COMMENTED.match(line)
                if m and m.group(1) not in text:
                    text[m.group(1)] = m.group(2).strip()
    return text

def _print_help(defaults, description, descriptions):
    if description:
        print(description.strip() + '\n')
    print(f"usage: python {os.path.basename(sys.argv[0])} [config_file ...] [--key=value ...]\n")
    width = max(map(len, defaults), default=0)
    for k, v in defaults.items():
        line = f"  --{k.ljust(width)}  {v!r}"
        print(f"{line:<{width + 24}}  {descriptions[k]}" if k in descriptions else line)

def configure(defaults, argv, description='', descriptions=None):
    """Resolve defaults <- config files (in order) <- --key=value overrides (left to right).
    A bool key given bare (--compile) is True. descriptions: {key: text} for --help (see describe)."""
    if '--help' in argv or '-h' in argv:
        _print_help(defaults, description, descriptions or {})
        raise SystemExit(0)
    config = dict(defaults)
    files = [a for a in argv if not a.startswith('--')]
    overrides = [a for a in argv if a.startswith('--')]
    # all files first, then all overrides, so the command line always has the last word
    for path in files:
        for k, v in load_config_file(path, config).items():
            if k not in defaults:
                raise _unknown_key(k, list(defaults), f"config file {path}")
            config[k] = _check(k, v, defaults[k], f"config file {path}")
    for arg in overrides:
        key, sep, raw = arg[2:].partition('=')
        if key not in defaults:
            raise _unknown_key(key, list(defaults), "command line")
        if not sep and type(defaults[key]) is bool:
            raw = 'True'
        elif not sep:
            raise ConfigError(f"--{key} needs a value, e.g. --{key}={defaults[key]!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word like shakespeare_char is meant as a string
        if type(defaults[key]) is str and not isinstance(value, str):
            value = raw  # e.g. --out_dir=2024 is the directory name, not an int
        config[key] = _check(key, value, defaults[key], "command line")
    return config

def configure_or_exit(defaults, argv, description='', descriptions=None):
    """configure(), but a ConfigError becomes 'error: ...' on stderr and exit status 2."""
    try:
        return configure(defaults, argv, description, descriptions)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

def print_config(config):
    # the key = value lines are valid Python, so this output can be saved as a config file
    for k, v in config.items():
        print(f"{k} = {v!r}")
