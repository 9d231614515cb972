//! How many downloads run at once, decided from deadlines rather than guessed in advance.
//!
//! Every queued file has a deadline (its token's expiry). What a file costs is estimated per host
//! from what the host has shown: time to first byte, throughput of one connection, file size.
//! [`plan`] walks the queue in deadline order and works out how many connections it takes for
//! every file to finish in time; [`Controller`] moves the limit towards that, doubling at most
//! every [`SETTLE`], and checks that each step bought throughput: when more connections no longer
//! raise the host's aggregate rate, the host is saturated, the limit goes back to the last level
//! that helped and stays there for [`RECHECK`]. A file that cannot make its deadline at the
//! capacity there is, is given up early instead of taking bandwidth from files that still can.
//!
//! Pure code: the clock is passed in, so all of it is tested without a network.

use std::time::{Duration, Instant};

/// Time given to a change of the limit before its effect on throughput is judged.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);
/// The window the aggregate rate is measured over; a step is taken only from a limit that has kept
/// every connection busy for that long, so that the rate it is judged against is the limit's own.
/// A rate of zero after that long (every connection waiting on a host that sends nothing) does not
/// stop growth: other hosts' files must still get connections, and a step from zero is not judged.
pub(crate) const MEASURE: Duration = Duration::from_secs(1);
/// How long a saturated host is left at the limit that saturated it before growth is tried again.
pub(crate) const RECHECK: Duration = Duration::from_secs(10);
/// Share of the time left that a plan counts on (the rest absorbs estimation error).
const SAFETY: f64 = 0.8;
/// A file is given up only when even this fraction of its estimated time would not fit.
const OPTIMISM: f64 = 0.7;
/// A step must add at least this share of the proportional throughput gain to count as helping.
const MIN_GAIN: f64 = 0.25;
/// Observations of a host before its estimates are trusted to give a file up.
const TRUSTED_AFTER: u32 = 3;

/// What one host has shown so far (moving averages).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HostEstimate {
    /// Seconds from request to response head.
    ttfb_secs: f64,
    /// Bytes per second of one connection, while the body streams.
    pub(crate) rate_bps: f64,
    /// Bytes of a file.
    size_bytes: f64,
    samples: u32,
}

impl HostEstimate {
    /// Before a host has answered anything: deliberately modest, so pressure shows early.
    pub(crate) const UNKNOWN: HostEstimate =
        HostEstimate { ttfb_secs: 0.5, rate_bps: 512.0 * 1024.0, size_bytes: 1024.0 * 1024.0, samples: 0 };

    /// Connection-seconds one file of this host takes.
    pub(crate) fn service_secs(&self) -> f64 {
        self.ttfb_secs + self.size_bytes / self.rate_bps.max(1.0)
    }

    /// Bytes of a typical file of this host (a moving average; 1 MiB before any).
    pub(crate) fn size_bytes(&self) -> f64 {
        self.size_bytes
    }

    /// Whether there is enough history to give a file up on these figures.
    pub(crate) fn trusted(&self) -> bool {
        self.samples >= TRUSTED_AFTER
    }

    /// Folds in one finished download.
    pub(crate) fn observe(&mut self, ttfb_secs: f64, bytes: u64, body_secs: f64) {
        let first = self.samples == 0;
        let mix = |old: f64, new: f64, w: f64| if first { new } else { old + w * (new - old) };
        self.ttfb_secs = mix(self.ttfb_secs, ttfb_secs.max(0.0), 0.2);
        self.size_bytes = mix(self.size_bytes, bytes as f64, 0.1);
        // Rates of tiny bodies measure latency, not bandwidth.
        if bytes >= 32 * 1024 && body_secs >= 0.02 {
            let rate = bytes as f64 / body_secs;
            self.rate_bps = if first { rate } else { self.rate_bps + 0.2 * (rate - self.rate_bps) };
        }
        self.samples = self.samples.saturating_add(1);
    }
}

/// A queued file, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Pending {
    /// Unix seconds at which its token dies.
    pub(crate) deadline: f64,
    /// Estimated connection-seconds it takes.
    pub(crate) service_secs: f64,
    /// Whether the estimate rests on observations (only then is a file given up on it).
    pub(crate) trusted: bool,
}

/// What the queue needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Connections for every file that can still make it to finish in time.
    pub(crate) required: usize,
    /// Files projected to miss their deadline at the current limit.
    pub(crate) at_risk: usize,
    /// Positions (in the input) of files that cannot make it at the capacity there is: their
    /// deadline passed, or, with no room to grow, they would not even finish at better than the
    /// estimated pace.
    pub(crate) doomed: Vec<usize>,
}

/// Plans the queue: `pending` in deadline order, `inflight_secs` the estimated connection-seconds
/// the running downloads still need, `limit` the current limit, `can_grow` whether it may rise.
///
/// The requirement counts every file whose deadline has not passed, including those given up in
/// the same plan: it says what the queue needs, so that a limit held by a saturated host is not
/// lowered because the files it could not serve were dropped.
pub(crate) fn plan(now: f64, pending: &[Pending], inflight_secs: f64, limit: usize, can_grow: bool) -> Plan {
    let limit = limit.max(1) as f64;
    // Work ahead of a file: of the files kept (what the limit will actually serve), and of all.
    let mut ahead = inflight_secs.max(0.0);
    let mut ahead_all = ahead;
    let mut required: f64 = 0.0;
    let mut out = Plan::default();
    for (i, p) in pending.iter().enumerate() {
        let left = p.deadline - now;
        if left <= 0.0 {
            out.doomed.push(i);
            continue;
        }
        let slack = left * SAFETY - p.service_secs;
        if slack > 0.0 {
            required = required.max(ahead_all / slack + 1.0);
        }
        ahead_all += p.service_secs;
        let finish = ahead / limit + p.service_secs;
        if !can_grow && p.trusted && OPTIMISM * finish >= left {
            // Not counted ahead of later files: it will not take their bandwidth.
            out.doomed.push(i);
            continue;
        }
        if finish > left {
            out.at_risk += 1;
        }
        ahead += p.service_secs;
    }
    out.required = required.ceil() as usize;
    out
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    from: usize,
    from_rate: f64,
    at: Instant,
}

/// The concurrency limit: between `floor` and `max`, following [`Plan::required`], held where the
/// host stops giving more throughput.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    floor: usize,
    max: usize,
    limit: usize,
    probe: Option<Probe>,
    /// A limit found to saturate the host, and until when it holds.
    ceiling: Option<(usize, Instant)>,
    /// Since when every connection the current limit allows has been busy.
    busy_since: Option<Instant>,
    peak: usize,
}

impl Controller {
    pub(crate) fn new(floor: usize, max: usize) -> Self {
        let floor = floor.max(1);
        let max = max.max(floor);
        Controller { floor, max, limit: floor, probe: None, ceiling: None, busy_since: None, peak: floor }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// The highest limit so far.
    #[cfg(test)]
    pub(crate) fn peak(&self) -> usize {
        self.peak
    }

    /// Whether the host was found saturated and growth is paused.
    pub(crate) fn saturated(&self, now: Instant) -> bool {
        self.ceiling.is_some_and(|(_, until)| now < until)
    }

    /// Whether the limit may still rise (a plan gives files up only when it may not).
    pub(crate) fn can_grow(&self, now: Instant) -> bool {
        self.limit < self.max && !self.saturated(now)
    }

    /// One step (called every tick). `rate`: the aggregate bytes/s over the last [`MEASURE`];
    /// `busy`: every allowed connection is in use (otherwise flat throughput says nothing about the
    /// host).
    pub(crate) fn update(&mut self, now: Instant, required: usize, busy: bool, rate: f64) -> usize {
        let before = self.limit;
        let limit = self.step(now, required, busy, rate);
        if limit != before || !busy {
            self.busy_since = None;
        } else if self.busy_since.is_none() {
            self.busy_since = Some(now);
        }
        limit
    }

    fn step(&mut self, now: Instant, required: usize, busy: bool, rate: f64) -> usize {
        if let Some(p) = self.probe {
            if now.duration_since(p.at) < SETTLE {
                return self.limit;
            }
            self.probe = None;
            if busy && p.from_rate > 0.0 {
                let proportional = self.limit as f64 / p.from as f64 - 1.0;
                if rate < p.from_rate * (1.0 + MIN_GAIN * proportional) {
                    self.limit = p.from;
                    self.ceiling = Some((p.from, now + RECHECK));
                    return self.limit;
                }
            }
        }
        if self.ceiling.is_some_and(|(_, until)| now >= until) {
            self.ceiling = None;
        }
        let want = required.clamp(self.floor, self.max);
        if want > self.limit {
            let measured = self.busy_since.is_some_and(|t| now.duration_since(t) >= MEASURE);
            if self.ceiling.is_none() && busy && measured {
                let next = want.min(self.limit * 2).max(self.limit + 1).min(self.max);
                self.probe = Some(Probe { from: self.limit, from_rate: rate, at: now });
                self.limit = next;
                self.peak = self.peak.max(next);
            }
        } else if want < self.limit {
            // Shrink by at most a quarter a step: pressure that comes back finds connections open.
            self.limit = want.max(self.limit - self.limit / 4).max(self.floor);
            if self.limit > want && self.limit - want == 1 {
                self.limit = want;
            }
        }
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(deadline: f64, service_secs: f64) -> Pending {
        Pending { deadline, service_secs, trusted: true }
    }

    #[test]
    fn a_queue_that_fits_needs_little_one_that_does_not_needs_more() {
        // 10 files of 1 s each, all due in 100 s: one connection would do.
        let q: Vec<_> = (0..10).map(|_| pending(100.0, 1.0)).collect();
        let p = plan(0.0, &q, 0.0, 1, true);
        assert!(p.required <= 2, "{p:?}");
        assert_eq!(p.at_risk, 0);
        // 1,000 files of 2 s each, due in 90 s: 2,000 connection-seconds in 72 usable seconds.
        let q: Vec<_> = (0..1000).map(|_| pending(90.0, 2.0)).collect();
        let p = plan(0.0, &q, 0.0, 16, true);
        assert!((28..=32).contains(&p.required), "{p:?}");
        assert!(p.at_risk > 250, "16 connections leave the last ~300 late: {p:?}");
        assert!(p.doomed.is_empty(), "with room to grow nothing is given up");
    }

    #[test]
    fn earliest_deadlines_drive_the_requirement() {
        // Work already running counts ahead of the queue.
        let q = vec![pending(10.0, 1.0), pending(1000.0, 1.0)];
        let idle = plan(0.0, &q, 0.0, 4, true).required;
        let busy = plan(0.0, &q, 70.0, 4, true).required;
        assert!(busy > idle * 5, "{idle} vs {busy}");
    }

    #[test]
    fn hopeless_files_are_given_up_only_without_room_to_grow() {
        let now = 1000.0;
        let mut q: Vec<_> = (0..40).map(|_| pending(now + 5.0, 1.0)).collect();
        q.push(pending(now - 1.0, 1.0));
        q.push(pending(now + 600.0, 1.0));
        let grow = plan(now, &q, 0.0, 4, true);
        assert_eq!(grow.doomed, vec![40], "only the expired one: {grow:?}");
        let stuck = plan(now, &q, 0.0, 4, false);
        // 4 connections, 1 s a file, 5 s left: about 16 fit; those that would not fit even at a 30 %
        // better pace are given up.
        assert!(stuck.doomed.len() > 10 && stuck.doomed.len() < 30, "{stuck:?}");
        assert!(stuck.doomed.contains(&40));
        assert!(!stuck.doomed.contains(&41), "the late-deadline file still fits");
        assert!(!stuck.doomed.contains(&0), "the earliest files are served, not given up");
        // Files given up take nothing from later ones: the far file is not at risk.
        let mut untrusted = q.clone();
        for p in &mut untrusted {
            p.trusted = false;
        }
        assert_eq!(plan(now, &untrusted, 0.0, 4, false).doomed, vec![40], "guesses give nothing up");
        assert_eq!(stuck.required, grow.required, "what is given up still counts as needed");
    }

    #[test]
    fn estimates_follow_observations() {
        let mut e = HostEstimate::UNKNOWN;
        assert!(!e.trusted());
        for _ in 0..5 {
            e.observe(0.3, 1_000_000, 1.0);
        }
        assert!(e.trusted());
        assert!((e.service_secs() - 1.3).abs() < 0.01, "{e:?}");
        e.observe(0.3, 100, 0.001);
        assert!((e.rate_bps - 1e6).abs() < 1.0, "a tiny body does not move the rate");
    }

    /// Ticks the controller every 250 ms for `secs` with the same inputs, as the dispatcher does;
    /// returns the limit and the time reached.
    fn run(c: &mut Controller, from: Instant, secs: f64, required: usize, busy: bool, rate: f64) -> (usize, Instant) {
        let tick = Duration::from_millis(250);
        let mut t = from;
        let mut limit = c.limit();
        for _ in 0..(secs / 0.25).round() as u32 {
            t += tick;
            limit = c.update(t, required, busy, rate);
        }
        (limit, t)
    }

    #[test]
    fn controller_grows_by_doubling_while_throughput_follows() {
        let t0 = Instant::now();
        let mut c = Controller::new(16, 256);
        // No step before the rate has been measured with every connection of this limit busy.
        assert_eq!(c.update(t0, 200, true, 0.0), 16);
        let (limit, t) = run(&mut c, t0, 0.75, 200, true, 16e6);
        assert_eq!(limit, 16, "busy for less than MEASURE");
        let (limit, t) = run(&mut c, t, 0.25, 200, true, 16e6);
        assert_eq!(limit, 32);
        let (limit, t) = run(&mut c, t, 1.5, 200, true, 20e6);
        assert_eq!(limit, 32, "settling");
        let (limit, t) = run(&mut c, t, 0.5, 200, true, 32e6);
        assert_eq!(limit, 64, "32 doubled the rate and has been busy for a MEASURE");
        let (limit, t) = run(&mut c, t, 2.0, 200, true, 64e6);
        assert_eq!(limit, 128);
        let (limit, t) = run(&mut c, t, 2.0, 200, true, 128e6);
        assert_eq!(limit, 200, "no further than required");
        assert_eq!(c.peak(), 200);
        // Pressure gone: back down to the floor, a quarter at a time.
        let (mut last, mut t) = run(&mut c, t, 2.0, 0, true, 190e6);
        let mut steps = 1;
        while last > 16 {
            t += Duration::from_millis(250);
            let next = c.update(t, 0, false, 0.0);
            assert!(next < last && next >= last * 3 / 4 - 1, "{last} → {next}");
            last = next;
            steps += 1;
        }
        assert!(steps < 15, "{steps}");
    }

    #[test]
    fn controller_stops_where_throughput_stops() {
        let t0 = Instant::now();
        let mut c = Controller::new(2, 256);
        let (limit, t) = run(&mut c, t0, 1.25, 100, true, 2e6);
        assert_eq!(limit, 4);
        let (limit, t) = run(&mut c, t, 2.0, 100, true, 4e6);
        assert_eq!(limit, 8, "4 → 8 after 2 → 4 doubled the rate");
        let (limit, t) = run(&mut c, t, 2.0, 100, true, 4.2e6);
        assert_eq!(limit, 4, "8 connections gave what 4 did: back to 4");
        assert!(c.saturated(t) && !c.can_grow(t));
        let (limit, t) = run(&mut c, t, 9.75, 100, true, 4e6);
        assert_eq!(limit, 4, "held while saturated");
        let (limit, _) = run(&mut c, t, 0.25, 100, true, 4e6);
        assert_eq!(limit, 8, "tried again after RECHECK");
        assert_eq!(c.peak(), 8);
    }

    #[test]
    fn a_step_is_judged_against_the_rate_of_the_limit_it_left() {
        // Start-up: the first ticks see no rate yet, or the ramp of connections still waiting for
        // their first byte. A step taken then would count as helping whatever it bought.
        let t0 = Instant::now();
        let mut c = Controller::new(8, 64);
        let (limit, t) = run(&mut c, t0, 0.5, 100, true, 0.0);
        assert_eq!(limit, 8, "no step on no measurement");
        let (limit, t) = run(&mut c, t, 1.0, 100, true, 1e6);
        assert_eq!(limit, 16);
        let (limit, t) = run(&mut c, t, 2.0, 100, true, 1.05e6);
        assert_eq!(limit, 8, "16 gave what 8 did: the host is saturated at 8");
        assert!(c.saturated(t));
        assert_eq!(c.peak(), 16);
    }

    #[test]
    fn connections_stuck_on_a_silent_host_do_not_stop_growth() {
        // Every connection waits on a host that accepted them and sends nothing: no bytes, so no
        // rate. Files of other hosts queue behind them; the limit must still grow.
        let t0 = Instant::now();
        let mut c = Controller::new(16, 256);
        let (limit, t) = run(&mut c, t0, 0.75, 100, true, 0.0);
        assert_eq!(limit, 16, "not before the limit has been busy for MEASURE");
        let (limit, t) = run(&mut c, t, 0.5, 100, true, 0.0);
        assert_eq!(limit, 32);
        let (limit, _) = run(&mut c, t, 2.25, 100, true, 0.0);
        assert_eq!(limit, 64, "a step from no rate at all is not judged: growth goes on");
        assert!(!c.saturated(t0 + SETTLE * 3));
    }

    #[test]
    fn flat_throughput_with_idle_connections_is_not_saturation() {
        let t0 = Instant::now();
        let mut c = Controller::new(2, 64);
        let (limit, t) = run(&mut c, t0, 1.25, 50, true, 2e6);
        assert_eq!(limit, 4);
        // The queue ran dry: connections idle, the rate flat. Not the host's fault.
        let (limit, t) = run(&mut c, t, 2.0, 50, false, 2e6);
        assert_eq!(limit, 4);
        assert!(!c.saturated(t));
        let (limit, _) = run(&mut c, t, 1.25, 50, true, 2e6);
        assert_eq!(limit, 8, "growth resumes once the limit is busy again");
    }
}
