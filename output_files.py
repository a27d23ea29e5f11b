"""Where a command writes what it was asked to write (`--json OUT`, `--out FIGURE`, results.json).

A new path or a regular file is written atomically: into a temporary file beside it, then renamed over it, so
a crash or a full disk never leaves half a file (the temporary file is removed and the error raised). A path
that exists and is not a regular file (a FIFO, a character device, /dev/stdout) is opened and written in
place: renaming a temporary file over it would replace the device or pipe itself, and as root replacing
/dev/stdout breaks the standard output of every later process on the machine. A symlink is followed, so a
link to a regular file stays a link. `-` means the standard output, for text; a figure cannot go there.
"""
import os
import stat
import sys

STDOUT = '-'


def is_special(path):
    """True when `path` (after symlinks) exists and is not a regular file: it must be written in place."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def replace_atomically(path, write):
    """Call write(tmp) on a temporary path beside `path`'s target, then rename it over the target."""
    target = os.path.realpath(path)
    tmp = target + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    """Write `text` to `path`: `-` the standard output, a FIFO or device in place, a file atomically."""
    if path == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
    elif is_special(path):
        with open(path, 'w') as f:
            f.write(text)
    else:
        def write(tmp):
            with open(tmp, 'w') as f:
                f.write(text)
        replace_atomically(path, write)


def save_figure(fig, path, dpi=100):
    """matplotlib's fig.savefig to `path` (a FIFO or device in place, a file atomically); its format is the
    extension's, PNG without one."""
    if path == STDOUT:
        raise ValueError('a figure cannot be written to standard output ("-"): give a file name (.png)')
    fmt = os.path.splitext(path)[1][1:] or 'png'
    if is_special(path):
        with open(path, 'wb') as f:
            fig.savefig(f, format=fmt, dpi=dpi, bbox_inches='tight')
    else:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches='tight'))
