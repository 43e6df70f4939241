"""A search: from settings to a finished study.

:mod:`.study` sets a search up (plugins, task, data, baseline, space) and records its trials;
:mod:`.local` runs the trials in this process or hands them to :mod:`.ray_backend`;
:mod:`.folder`, :mod:`.lock`, :mod:`.journal` and :mod:`.storage` keep the study safe on disk
or in a database; :mod:`.retrain` trains the front again, :mod:`.pareto` collects the outcome
(``pareto.json``) and :mod:`.progress` shows the search as it runs.
"""
