//! Zoom and pan: the map from layout coordinates (CSS pixels of the unzoomed drawing) to the screen.

use super::layout::Point;

pub const MIN_ZOOM: f64 = 0.25;
pub const MAX_ZOOM: f64 = 40.0;

/// `screen = world × zoom + pan`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Viewport {
    pub zoom: f64,
    pub pan: (f64, f64),
}

impl Default for Viewport {
    fn default() -> Self {
        Viewport {
            zoom: 1.0,
            pan: (0.0, 0.0),
        }
    }
}

impl Viewport {
    pub fn to_screen(&self, p: Point) -> Point {
        Point {
            x: p.x * self.zoom + self.pan.0,
            y: p.y * self.zoom + self.pan.1,
        }
    }

    pub fn to_world(&self, p: Point) -> Point {
        Point {
            x: (p.x - self.pan.0) / self.zoom,
            y: (p.y - self.pan.1) / self.zoom,
        }
    }

    /// Zooms by `factor` keeping the world point under `at` (screen) where it is.
    pub fn zoom_at(self, at: Point, factor: f64) -> Viewport {
        let zoom = (self.zoom * factor).clamp(MIN_ZOOM, MAX_ZOOM);
        let world = self.to_world(at);
        Viewport {
            zoom,
            pan: (at.x - world.x * zoom, at.y - world.y * zoom),
        }
    }

    pub fn pan_by(self, dx: f64, dy: f64) -> Viewport {
        Viewport {
            pan: (self.pan.0 + dx, self.pan.1 + dy),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zooming_keeps_the_point_under_the_cursor() {
        let v = Viewport::default().pan_by(30.0, -10.0);
        let at = Point { x: 200.0, y: 150.0 };
        let before = v.to_world(at);
        let z = v.zoom_at(at, 3.0);
        assert_eq!(z.zoom, 3.0);
        let after = z.to_world(at);
        assert!((before.x - after.x).abs() < 1e-9 && (before.y - after.y).abs() < 1e-9);
        let back = z.to_screen(after);
        assert!((back.x - at.x).abs() < 1e-9 && (back.y - at.y).abs() < 1e-9);
    }

    #[test]
    fn zoom_is_clamped() {
        let at = Point { x: 0.0, y: 0.0 };
        assert_eq!(Viewport::default().zoom_at(at, 1e9).zoom, MAX_ZOOM);
        assert_eq!(Viewport::default().zoom_at(at, 1e-9).zoom, MIN_ZOOM);
    }
}
