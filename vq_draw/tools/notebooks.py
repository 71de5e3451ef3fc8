"""Stopping a notebook early with one line, the same in Jupyter and under nbclient.

A notebook that cannot go on (no model, no data) could raise, but Jupyter then shows a
traceback and nbclient (``jupyter nbconvert --execute``, ``make_images --notebooks``) raises
``CellExecutionError``. Instead, the cell that finds the problem calls ``stop_here(message)``:
the message is printed, and every later cell runs as an empty cell, so "Run All" and nbclient
both end cleanly with that one line as the only output. Running the stopping cell again (after
the fix) runs it as written; it calls ``go_on()`` first, so the later cells run again too.
"""


def _shell():
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("stop_here and go_on work only inside IPython or Jupyter")
    return shell


def _skip_unless_stopping_cell(lines):
    """An IPython input transformer: cells are dropped, except one that calls stop_here."""
    return lines if any("stop_here(" in line for line in lines) else []


def stop_here(message):
    """Print ``message`` (one line) and run the notebook's later cells as nothing."""
    print(message)
    transformers = _shell().input_transformers_cleanup
    if _skip_unless_stopping_cell not in transformers:
        transformers.append(_skip_unless_stopping_cell)


def go_on():
    """Undo an earlier ``stop_here``: later cells run again."""
    transformers = _shell().input_transformers_cleanup
    while _skip_unless_stopping_cell in transformers:
        transformers.remove(_skip_unless_stopping_cell)
