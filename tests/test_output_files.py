"""Output paths: `-` is the standard output, a FIFO or device is written in place (never replaced by a rename),
a regular file atomically. Never tested on the real /dev/stdout: as root a wrong rename would break it for the
whole machine; a FIFO in tmp_path and a symlink to it stand in for it."""
import glob
import json
import os
import stat
import threading

import pytest

import eval as eval_script
import figures
import output_files
import train
from tests.conftest import TINY_MOE_ARGS

RECORDS = [{'method': 'SMoE', 'results': {'1': 1.25, '2': 1.5}}]


def read_fifo_in_background(path):
    """Start a thread reading the FIFO to its end (a writer blocks until a reader opens it); returns a
    function that waits for the bytes read (None when nothing arrived within the timeout)."""
    received = []
    reader = threading.Thread(target=lambda: received.append(open(path, 'rb').read()), daemon=True)
    reader.start()

    def result(timeout=10):
        reader.join(timeout)
        return received[0] if received else None
    return result


@pytest.fixture
def fifo(tmp_path):
    path = str(tmp_path / 'out.fifo')
    os.mkfifo(path)
    return path


def test_dash_writes_the_json_to_the_standard_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    eval_script.evaluation.write_json('-', RECORDS)
    assert json.loads(capsys.readouterr().out) == RECORDS
    assert os.listdir(tmp_path) == []                    # no file named '-'


@pytest.mark.parametrize('through_symlink', [False, True], ids=['fifo', 'symlink_to_fifo'])
def test_a_fifo_receives_the_json_and_stays_a_fifo(fifo, tmp_path, through_symlink):
    path = fifo
    if through_symlink:                                  # as /dev/stdout -> /proc/self/fd/1 -> pipe
        path = str(tmp_path / 'stdout_link')
        os.symlink(fifo, path)
    received = read_fifo_in_background(fifo)
    eval_script.evaluation.write_json(path, RECORDS)
    assert json.loads(received()) == RECORDS
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISFIFO(os.stat(path).st_mode)
    assert os.path.islink(path) == through_symlink
    assert sorted(os.listdir(tmp_path)) == sorted({'out.fifo', os.path.basename(path)})   # no .tmp left


def test_a_regular_file_is_replaced_whole_and_a_symlink_to_it_stays_a_symlink(tmp_path):
    target, link = tmp_path / 'results.json', tmp_path / 'link.json'
    target.write_text('old content, longer than the new one ' * 10)
    os.symlink(target, link)
    eval_script.evaluation.write_json(str(link), RECORDS)
    assert os.path.islink(link) and json.loads(target.read_text()) == RECORDS
    assert sorted(os.listdir(tmp_path)) == ['link.json', 'results.json']


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / 'results.json'
    target.write_text('[]')

    def full_disk(tmp):
        open(tmp, 'w').write('partial')
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError):
        output_files.replace_atomically(str(target), full_disk)
    assert os.listdir(tmp_path) == ['results.json'] and target.read_text() == '[]'


def test_a_figure_goes_into_a_fifo_in_place_and_cannot_go_to_the_standard_output(tmp_path, capsys):
    fifo = str(tmp_path / 'figure.png')
    os.mkfifo(fifo)
    plt = figures.pyplot()
    received = read_fifo_in_background(fifo)
    figures.save(plt.figure(figsize=(1, 1)), fifo)
    assert received().startswith(b'\x89PNG') and stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(SystemExit):
        eval_script.main(['--diagram', '--out', '-'])
    assert 'error: --out writes a figure' in capsys.readouterr().err


def test_eval_run_json_dash_prints_the_json_alone(tmp_path, synthetic_dir, capsys):
    work = str(tmp_path / 'runs')
    train.main([*TINY_MOE_ARGS, '--data', synthetic_dir, '--work_dir', work, '--max_step', '2',
                '--eval-interval', '2'])
    [run_dir] = glob.glob(f'{work}-synthetic/*')
    capsys.readouterr()
    eval_script.main(['--run', run_dir, '--max_eval_steps', '2', '--ks', '1,2', '--json', '-'])
    captured = capsys.readouterr()
    entries = json.loads(captured.out)                   # nothing but the JSON on stdout
    assert [e['checkpoint'] for e in entries] == ['best', 'best_dense']
    assert 'bpc' in captured.err                         # the tables went to stderr
    assert not os.path.exists(os.path.join(run_dir, 'eval_test.json'))
