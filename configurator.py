"""
Strict configurator: config files and --key=value overrides on top of a script's defaults.
Same command line as nanoGPT's exec-style configurator, but it is a function you call, and
a typo'd key or a wrongly typed value is an error instead of a silently ignored new global.
$ python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
"""
import ast
import difflib
import os
import sys
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
    """Exec a Python config file on top of namespace; return the settings it leaves behind."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    ns = dict(namespace or {})
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), ns)
    # imports, helper functions and _private names are the file's own business, not settings
    return {k: v for k, v in ns.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType) and not callable(v)}

def _print_help(defaults, description):
    if description:
        print(description.strip() + '\n')
    print(f"usage: python {os.path.basename(sys.argv[0])} [config_file ...] [--key=value ...]\n")
    width = max(map(len, defaults), default=0)
    for k, v in defaults.items():
        print(f"  --{k.ljust(width)}  default: {v!r}")

def configure(defaults, argv, description=''):
    """Resolve defaults <- config files (in order) <- --key=value overrides (left to right)."""
    if '--help' in argv or '-h' in argv:
        _print_help(defaults, description)
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
        if not sep:
            raise ConfigError(f"--{key} needs a value, e.g. --{key}={defaults[key]!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word like shakespeare_char is meant as a string
        if type(defaults[key]) is str and not isinstance(value, str):
            value = raw  # e.g. --out_dir=2024 is the directory name, not an int
        config[key] = _check(key, value, defaults[key], "command line")
    return config

def configure_or_exit(defaults, argv, description=''):
    """configure(), but a ConfigError becomes 'error: ...' on stderr and exit status 2."""
    try:
        return configure(defaults, argv, description)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

def print_config(config):
    # the key = value lines are valid Python, so this output can be saved as a config file
    for k, v in config.items():
        print(f"{k} = {v!r}")
