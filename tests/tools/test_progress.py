"""The quickstart's whole-run ETA (aqdetr_d2/experiments/progress.py) on a fake clock."""
import pytest

from aqdetr_d2.experiments.progress import RunPlan

# Lines as Detectron2 writes them (from a quickstart log).
EVENTS = ("[12/07 07:41:11 d2.utils.events]:  eta: {eta}  iter: 199  total_loss: 4.941  loss_ce: 0.0879  "
          "time: {per_iter}  last_time: 1.4514  data_time: 0.0191  last_data_time: 0.0192   lr: 5e-05  \n")
INFERENCE = ("[12/07 07:35:40 d2.evaluation.evaluator]: Total inference time: 0:00:30.000000 "
             "(0.030030 s / iter per device, on 1 devices)\n")


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def plan():
    """Two slots; two fine-tunes running, one queued, then two evaluations (the quickstart's order)."""
    clock = Clock()
    plan = RunPlan(2, clock=clock)
    plan.clock = clock
    for name, kind, iters in [("aq", "aq", 1000), ("fp", "fp", 1000), ("lsq", "lsq", 1000),
                              ("teacher", "evaluation", 0), ("ptq", "evaluation", 0)]:
        plan.add(name, kind, iters)
    plan.start("aq")
    plan.start("fp")
    return plan


def test_no_eta_before_a_run_logs_its_speed(plan):
    assert plan.remaining_seconds() is None and plan.eta_text() == ""


def test_queued_runs_take_the_first_free_slot(plan):
    assert plan.observe("aq", EVENTS.format(eta="0:20:00", per_iter="1.5000")) == 1.5
    assert plan.observe("aq", EVENTS.format(eta="0:19:30", per_iter="1.5000")) is None  # only the first line
    plan.observe("fp", EVENTS.format(eta="0:10:00", per_iter="0.7500"))
    # slots 1170 s (aq: the later line) and 600 s (fp); lsq, of a kind not seen, at the mean speed
    # (1.125 s x 1000) joins fp's slot; no evaluation seen yet counts as 0 s
    assert plan.remaining_seconds() == pytest.approx(600 + 1125)
    plan.clock.now += 100
    assert plan.remaining_seconds() == pytest.approx(500 + 1125)


def test_evaluations_take_the_time_logged_and_days_parse(plan):
    plan.observe("aq", EVENTS.format(eta="1 day, 0:00:00", per_iter="1.0000"))
    plan.observe("fp", EVENTS.format(eta="0:00:10", per_iter="1.0000"))
    plan.observe("fp", INFERENCE)  # fp's training is over, its evaluation took 30 s
    plan.finish("fp")
    plan.start("lsq")
    # aq: a day of training + its evaluation; lsq: 1000 x 1 s + 30 s, then both evaluations (30 s each)
    assert plan.remaining_seconds() == pytest.approx(max(86400 + 30, 1030 + 30 + 30))
    plan.observe("lsq", EVENTS.format(eta="0:00:20", per_iter="1.0000"))
    assert plan.remaining_seconds() == pytest.approx(86400 + 30)
    assert f"{(86400 + 30) / 60:.0f} min left" in plan.eta_text()


def test_a_finished_evaluation_job_sets_the_evaluation_time(plan):
    plan.observe("aq", EVENTS.format(eta="0:01:00", per_iter="1.0000"))
    plan.observe("fp", EVENTS.format(eta="0:01:00", per_iter="1.0000"))
    plan.finish("aq")
    plan.finish("fp")
    plan.start("lsq")
    plan.start("teacher")
    plan.clock.now += 45
    plan.finish("teacher")  # an evaluation-only job of 45 s
    plan.start("ptq")
    # lsq: 1000 s + 45 s left from its start 45 s ago; ptq: 45 s
    assert plan.remaining_seconds() == pytest.approx(1000 + 45 - 45)
