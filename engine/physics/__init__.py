"""The physics reference: a real dose calculation (pyRadPlan) next to the AI model.

* :mod:`engine.physics.dose_calc` - case + plan -> optimised physics dose, run in the isolated
  pyRadPlan environment through :mod:`engine.physics.worker` (a script, never imported here);
* :mod:`engine.physics.quick_plan` - the same objectives optimised in a fraction of a second in
  numpy on the same pencil beam, cut short: an approximate plan the dose refiner reads;
* :mod:`engine.physics.photon_kernel` - that pencil beam's machine data (pyRadPlan's generic
  6 MV kernel), for the quick plan;
* :mod:`engine.physics.quality` - the acceptance rule a generated plan must pass;
* :mod:`engine.physics.dataset` - angle-varied training plans on OpenKBP anatomy (arrangements,
  plan files, the resumable generator);
* :mod:`engine.physics.pack` - the compact committed form of those plans, and back.

Dependencies run one way: ``dataset``, ``pack`` and ``quick_plan`` use ``dose_calc``,
``quality`` and :mod:`engine.io` (``quick_plan`` also ``photon_kernel``); nothing in
:mod:`engine.io` imports this package.
"""
