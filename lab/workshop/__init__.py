"""``lab exercise`` and ``lab check``: a learner's file, loaded safely and graded by its contract's grader."""
