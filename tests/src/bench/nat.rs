//! Benchmark part `nat`: `nat` forwarding against the floor and `dsr` in the same run.
//!
//! - Packet rate (`rate::run_nat`, the rate part's rig and generator): the 65,536-client UDP
//!   walk through the floor, lb `dsr`, lb `nat` requests and lb `nat` replies.
//! - Whole-path HTTP (`http::run_nat`, the http part's machinery): wrk through a `nat` service
//!   against nginx directly, lb `dsr` and HAProxy, rounds interleaved.

use anyhow::Result;

use super::{Figure, Opts};

pub fn run(opts: &Opts) -> Result<Vec<Figure>> {
    let mut figures = super::rate::run_nat(opts)?;
    figures.extend(super::http::run_nat(opts)?);
    Ok(figures)
}
