"""The task table: a task that does not fit the model's head is refused with the tasks that
would fit it; an unknown task is refused with the known ones."""

from __future__ import annotations

import pytest

import mbcompile
from mbcompile.pipelines import PipelineError


def test_wrong_task_for_the_head_is_refused(qa, tok):
    _, compiled = qa
    with pytest.raises(PipelineError, match=r"'fill-mask' needs .*question-answering"):
        mbcompile.pipeline("fill-mask", compiled, tokenizer=tok)
    with pytest.raises(PipelineError, match="Unknown task 'summarization'"):
        mbcompile.pipeline("summarization", compiled, tokenizer=tok)


def test_wrong_task_names_every_task_that_fits_the_head(pruned_pretraining, tok):
    _, compiled = pruned_pretraining
    fitting = r"\['fill-mask', 'next-sentence-prediction'\]"
    with pytest.raises(PipelineError, match=r"head 'pretraining'\); for this model use " + fitting):
        mbcompile.pipeline("question-answering", compiled, tokenizer=tok)
