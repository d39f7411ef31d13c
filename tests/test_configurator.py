import pytest

from configurator import ConfigError, configure, configure_or_exit, describe, print_config

DEFAULTS = {'n_layer': 12, 'n_head': 12, 'dropout': 0.0, 'learning_rate': 6e-4,
            'compile': True, 'dataset': 'openwebtext', 'seed': None}

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)

def test_defaults_returned_in_order_as_new_dict():
    config = configure(DEFAULTS, [])
    assert config == DEFAULTS and config is not DEFAULTS
    assert list(config) == list(DEFAULTS)

def test_unknown_key_on_command_line_suggests_close_match():
    with pytest.raises(ConfigError, match=r"n_layr.*command line.*n_layer"):
        configure(DEFAULTS, ['--n_layr=3'])

def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(ConfigError, match=r"--help"):
        configure(DEFAULTS, ['--zzzzzz=3'])

def test_unknown_key_in_config_file_names_file_and_suggestion(tmp_path):
    path = write(tmp_path, 'cfg.py', 'n_layer = 6\nlearning_rat = 1e-3\n')
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, [path])
    assert 'learning_rat' in str(e.value) and path in str(e.value) and 'learning_rate' in str(e.value)

def test_files_in_order_then_overrides_left_to_right(tmp_path):
    a = write(tmp_path, 'a.py', 'n_layer = 6\nn_head = 6\n')
    b = write(tmp_path, 'b.py', 'n_layer = n_layer * 2\n')  # sees values set so far
    # the override comes first in argv yet still beats the files
    config = configure(DEFAULTS, ['--n_head=3', a, b, '--n_head=4'])
    assert config['n_layer'] == 12 and config['n_head'] == 4

def test_int_accepted_for_float(tmp_path):
    config = configure(DEFAULTS, ['--learning_rate=1'])
    assert config['learning_rate'] == 1.0 and type(config['learning_rate']) is float
    path = write(tmp_path, 'cfg.py', 'dropout = 0\n')
    assert type(configure(DEFAULTS, [path])['dropout']) is float

def test_float_for_int_rejected():
    with pytest.raises(ConfigError, match=r"n_layer.*int.*3\.5"):
        configure(DEFAULTS, ['--n_layer=3.5'])

def test_bool_parsing_and_bool_int_mixups_rejected(tmp_path):
    assert configure(DEFAULTS, ['--compile=False'])['compile'] is False
    with pytest.raises(ConfigError, match='compile'):
        configure(DEFAULTS, ['--compile=0'])
    with pytest.raises(ConfigError, match='compile'):
        configure(DEFAULTS, ['--compile=false'])
    with pytest.raises(ConfigError, match='n_layer'):
        configure(DEFAULTS, ['--n_layer=True'])
    with pytest.raises(ConfigError, match='dropout'):
        configure(DEFAULTS, [write(tmp_path, 'cfg.py', 'dropout = True\n')])

def test_none_default_accepts_anything():
    assert configure(DEFAULTS, ['--seed=1337'])['seed'] == 1337
    assert configure(DEFAULTS, ['--seed=abc'])['seed'] == 'abc'

def test_string_values_unquoted_or_quoted():
    assert configure(DEFAULTS, ['--dataset=shakespeare_char'])['dataset'] == 'shakespeare_char'
    assert configure(DEFAULTS, ["--dataset='shakespeare'"])['dataset'] == 'shakespeare'
    assert configure(DEFAULTS, ['--dataset=2024'])['dataset'] == '2024'

def test_imports_functions_and_private_names_are_not_settings(tmp_path):
    path = write(tmp_path, 'cfg.py', 'import math\nfrom math import sqrt\n_scale = 2\n'
                 'def helper(): return 1\nn_layer = int(math.sqrt(16)) * _scale\n')
    assert configure(DEFAULTS, [path])['n_layer'] == 8

def test_missing_file_error():
    with pytest.raises(ConfigError, match='no_such_config.py'):
        configure(DEFAULTS, ['no_such_config.py'])

def test_help_lists_every_key_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, ['--n_layr=3', '--help'], 'Train a GPT.')
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('Train a GPT.') and 'usage: python' in out
    for k, v in DEFAULTS.items():
        assert k in out and repr(v) in out
    with pytest.raises(SystemExit):
        configure(DEFAULTS, ['-h'])

def test_key_without_value_errors_unless_bool():
    with pytest.raises(ConfigError, match=r"--n_layer needs a value"):
        configure(DEFAULTS, ['--n_layer'])
    assert configure({**DEFAULTS, 'compile': False}, ['--compile'])['compile'] is True

def test_help_shows_each_keys_comment(tmp_path, capsys):
    source = write(tmp_path, 'defaults.py', "n_layer = 12  # transformer blocks\nfields = dict(\n    seed=None,  # random seed\n)\n")
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, ['--help'], descriptions=describe(source))
    out = capsys.readouterr().out
    assert e.value.code == 0 and 'transformer blocks' in out and 'random seed' in out

def test_config_file_errors_name_file_and_line(tmp_path):
    for text, what in (('n_layer = 6\nn_head = (\n', 'never closed'), ('n_layer = 6\nn_head = nope\n', 'NameError')):
        path = write(tmp_path, 'cfg.py', text)
        with pytest.raises(ConfigError, match=rf"cfg.py, line 2: .*{what}"):
            configure(DEFAULTS, [path])

def test_configure_or_exit_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        configure_or_exit(DEFAULTS, ['--n_layr=3'])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith('error: ')
    assert configure_or_exit(DEFAULTS, ['--n_layer=3'])['n_layer'] == 3

def test_print_config(capsys):
    print_config({'n_layer': 6, 'dataset': 'shakespeare_char'})
    assert capsys.readouterr().out == "n_layer = 6\ndataset = 'shakespeare_char'\n"
