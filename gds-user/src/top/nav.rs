//! Which stall `top` has selected and whether its evidence screen is open: keys in, state
//! out; no drawing and no fetching here.
//!
//! On the main screen ↑/↓ (or k/j) move the selection over the stalls (active, then ended),
//! Enter opens the selected stall's evidence, q or Esc quits. On the evidence screen ↑/↓
//! (k/j) and PgUp/PgDn scroll, Esc, q or ← go back. Ctrl-C quits from both. The selection
//! follows its stall across refreshes (and when it ends); the open screen keeps the stall as
//! last seen once the agent forgets it.

use gds_api::model::{Evidence, Stall};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::evidence::{StallId, evidence_of};

/// What a key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Quit,
    /// The screen changes.
    Redraw,
    Nothing,
}

/// The stall whose evidence is on screen, as last seen, with the evidence it had then (its
/// own, or the capture it shared with another stall of its thread and disk).
#[derive(Debug, Clone)]
pub struct Opened {
    id: StallId,
    pub stall: Stall,
    pub evidence: Option<(Evidence, bool)>,
    /// Lines scrolled off the top.
    pub scroll: u16,
}

#[derive(Debug, Default)]
pub struct Nav {
    /// Row of the selected stall in the list; meaningful only while there are stalls.
    index: usize,
    selected: Option<StallId>,
    pub open: Option<Opened>,
}

/// Lines PgUp/PgDn scroll.
const PAGE: u16 = 10;

impl Nav {
    /// The selected row of `stalls` (the list as drawn), if any.
    pub fn selected(&self, stalls: &[&Stall]) -> Option<usize> {
        (!stalls.is_empty()).then(|| self.index.min(stalls.len() - 1))
    }

    /// After a refresh: the selection moves to where its stall now is (else stays on the
    /// same row), and the open stall is updated (it may have ended meanwhile).
    pub fn follow(&mut self, stalls: &[&Stall]) {
        if let Some(i) = self
            .selected
            .as_ref()
            .and_then(|id| stalls.iter().position(|s| StallId::of(s) == *id))
        {
            self.index = i;
        }
        if let Some(i) = self.selected(stalls) {
            self.selected = Some(StallId::of(stalls[i]));
        }
        if let Some(o) = &mut self.open
            && let Some(s) = stalls.iter().find(|s| StallId::of(s) == o.id)
        {
            let ev = evidence_of(s, stalls.iter().copied()).map(|(e, shared)| (e.clone(), shared));
            o.stall = (*s).clone();
            // A later report may carry the stall without the evidence (its capture's
            // first stall ended and was dropped): keep what was seen.
            if ev.is_some() {
                o.evidence = ev;
            }
        }
    }

    pub fn key(&mut self, k: &KeyEvent, stalls: &[&Stall]) -> Outcome {
        if k.kind != KeyEventKind::Press {
            return Outcome::Nothing;
        }
        if k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL) {
            return Outcome::Quit;
        }
        match &mut self.open {
            Some(o) => match k.code {
                KeyCode::Esc | KeyCode::Char('q') | KeyCode::Left | KeyCode::Backspace => {
                    self.open = None;
                    Outcome::Redraw
                }
                KeyCode::Down | KeyCode::Char('j') => scroll(o, |s| s.saturating_add(1)),
                KeyCode::Up | KeyCode::Char('k') => scroll(o, |s| s.saturating_sub(1)),
                KeyCode::PageDown | KeyCode::Char(' ') => scroll(o, |s| s.saturating_add(PAGE)),
                KeyCode::PageUp => scroll(o, |s| s.saturating_sub(PAGE)),
                KeyCode::Home => scroll(o, |_| 0),
                _ => Outcome::Nothing,
            },
            None => match k.code {
                KeyCode::Esc | KeyCode::Char('q') => Outcome::Quit,
                KeyCode::Down | KeyCode::Char('j') => self.move_to(stalls, |i| i.saturating_add(1)),
                KeyCode::Up | KeyCode::Char('k') => self.move_to(stalls, |i| i.saturating_sub(1)),
                KeyCode::Home => self.move_to(stalls, |_| 0),
                KeyCode::End => self.move_to(stalls, |_| usize::MAX),
                KeyCode::Enter => match self.selected(stalls) {
                    Some(i) => {
                        let s = stalls[i];
                        self.open = Some(Opened {
                            id: StallId::of(s),
                            stall: s.clone(),
                            evidence: evidence_of(s, stalls.iter().copied())
                                .map(|(e, shared)| (e.clone(), shared)),
                            scroll: 0,
                        });
                        Outcome::Redraw
                    }
                    None => Outcome::Nothing,
                },
                _ => Outcome::Nothing,
            },
        }
    }

    fn move_to(&mut self, stalls: &[&Stall], to: impl Fn(usize) -> usize) -> Outcome {
        let Some(i) = self.selected(stalls) else {
            return Outcome::Nothing;
        };
        self.index = to(i).min(stalls.len() - 1);
        self.selected = Some(StallId::of(stalls[self.index]));
        if self.index == i {
            Outcome::Nothing
        } else {
            Outcome::Redraw
        }
    }
}

fn scroll(o: &mut Opened, to: impl Fn(u16) -> u16) -> Outcome {
    o.scroll = to(o.scroll);
    Outcome::Redraw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::evidence::tests::throttled_stall;

    fn press(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn stall(sector: u64) -> Stall {
        let mut s = throttled_stall();
        s.request.target.sector = Some(sector);
        s
    }

    #[test]
    fn the_selection_moves_opens_and_goes_back() {
        let (a, b, c) = (stall(1), stall(2), stall(3));
        let list = [&a, &b, &c];
        let mut nav = Nav::default();
        assert_eq!(nav.selected(&list), Some(0));
        assert_eq!(nav.key(&press(KeyCode::Up), &list), Outcome::Nothing);
        assert_eq!(nav.key(&press(KeyCode::Down), &list), Outcome::Redraw);
        assert_eq!(nav.key(&press(KeyCode::Char('j')), &list), Outcome::Redraw);
        assert_eq!(nav.key(&press(KeyCode::Down), &list), Outcome::Nothing);
        assert_eq!(nav.selected(&list), Some(2));
        assert_eq!(nav.key(&press(KeyCode::Char('k')), &list), Outcome::Redraw);
        assert_eq!(nav.key(&press(KeyCode::Enter), &list), Outcome::Redraw);
        let o = nav.open.as_ref().unwrap();
        assert_eq!(o.stall.request.target.sector, Some(2));
        assert!(o.evidence.is_some());
        // q on the evidence screen goes back; on the list it quits.
        nav.key(&press(KeyCode::PageDown), &list);
        assert_eq!(nav.open.as_ref().unwrap().scroll, PAGE);
        assert_eq!(nav.key(&press(KeyCode::Char('q')), &list), Outcome::Redraw);
        assert!(nav.open.is_none());
        assert_eq!(nav.key(&press(KeyCode::Esc), &list), Outcome::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        nav.key(&press(KeyCode::Enter), &list);
        assert_eq!(nav.key(&ctrl_c, &list), Outcome::Quit);
    }

    #[test]
    fn the_selection_follows_its_stall_and_the_open_one_is_kept() {
        let (a, b, c) = (stall(1), stall(2), stall(3));
        let mut nav = Nav::default();
        nav.key(&press(KeyCode::Down), &[&a, &b]);
        assert_eq!(nav.selected(&[&a, &b]), Some(1));
        // A new stall comes first: the selection stays on b.
        nav.follow(&[&c, &a, &b]);
        assert_eq!(nav.selected(&[&c, &a, &b]), Some(2));
        nav.key(&press(KeyCode::Enter), &[&c, &a, &b]);
        // b ends: the open screen shows it ended.
        let mut ended = b.clone();
        ended.total_seconds = Some(4.5);
        nav.follow(&[&c, &a, &ended]);
        assert_eq!(nav.open.as_ref().unwrap().stall.total_seconds, Some(4.5));
        // The agent forgets it: the screen keeps what it saw, evidence included.
        nav.follow(&[&c]);
        let o = nav.open.as_ref().unwrap();
        assert_eq!(o.stall.request.target.sector, Some(2));
        assert!(o.evidence.is_some());
        // No stalls at all: nothing selected, Enter does nothing.
        let mut nav = Nav::default();
        assert_eq!(nav.selected(&[]), None);
        assert_eq!(nav.key(&press(KeyCode::Enter), &[]), Outcome::Nothing);
    }
}
