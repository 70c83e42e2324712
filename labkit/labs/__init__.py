"""The code behind the lab notebooks: one module per lab, and the setup they share.

Book: the labs (``labs/README.md``). A lab notebook shows the experiment; what it needs beyond
that lives here, so that the notebook's cells stay short and the tests can drive the same code.

=========================  ======================================================  ============
module                     notebook (``labs/``), what it reproduces                book chapter
=========================  ======================================================  ============
:mod:`labkit.labs.lab1`    ``lab1_optimizer_zoo``, the power-eta thesis Fig. 1-2               4
:mod:`labkit.labs.lab2`    ``lab2_seeing_smoothing``, Sato & Iiduka (2024) Fig. 3, Sato & Iiduka
(2023)    6, 7
:mod:`labkit.labs.lab3`    ``lab3_critical_batch``, Sato & Iiduka (2024) Fig. 4 and §4.3       8
:mod:`labkit.labs.lab4`    ``lab4_smoothing_generalization``, Sato & Iiduka (2024) Fig. 5-7    6, 8
:mod:`labkit.labs.lab5`    ``lab5_implicit_graduated``, Sato & Iiduka (2023)                   7
:mod:`labkit.labs.lab6`    ``lab6_sharpness``, Sato & Iiduka (2024) Fig. 8                     8
=========================  ======================================================  ============

Every lab module defines ``LAB_ID``, the notebook's file name without ``.ipynb`` (the lab's
results folder, the prefix of its grade_ids and its ``metadata.labkit.lab``). Every lab that
trains (1, 3, 4, 5, 6) gives its :class:`labkit.widgets.ExperimentPanel` the same interface:

- ``controls()``: the panel's knobs, name -> widget;
- ``defaults(profile)``: the knob values of the smoke, cpu, short and paper profiles;
- ``validate(values)``: why the knobs cannot run, as messages (empty when they can);
- ``grid(values)``: the runs the knobs ask for, a list of :class:`labkit.train.TrainConfig`;
- ``label(config)``: a run's name in the panel's plot and table;
- ``on_result(panel)`` (labs 3, 4, 6): what the panel draws after each sweep.

Lab 4 trains lab 3's sweep and takes its grid from :mod:`labkit.labs.lab3`. Lab 2 trains
nothing: its panel is a :class:`labkit.widgets.ControlPanel` (:func:`labkit.labs.lab2.panel`).

Shared by every lab (:mod:`labkit.labs.setup`, re-exported here):

- :func:`lab_setup`: the profile, the results folder, the data folder and the seeds;
- :func:`results_dir`: ``$LABKIT_RESULTS/<lab>/<profile>`` or ``labs/results/<lab>/<profile>``.

A notebook imports its own module, e.g. ``from labkit.labs import lab3``; importing
:mod:`labkit.labs` loads none of the lab modules.

The notebooks students get, ``labs/<lab>.ipynb``, are made from the instructor sources with the
solutions, ``labs/source/<lab>.ipynb``, by :mod:`labkit.labs.release`
(``python -m labkit.labs.release``, nbgrader's ``generate_assignment``).
"""

from labkit.labs.setup import LabSetup, lab_setup, results_dir, results_root

__all__ = ["LabSetup", "lab_setup", "results_dir", "results_root"]
