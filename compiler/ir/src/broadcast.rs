//! Numpy-style broadcasting rules shared by shape inference and kernels.

use crate::IrError;

/// The shape all of `shapes` broadcast to, or an error naming the clash.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Result<Vec<usize>, IrError> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for shape in shapes {
        let offset = rank - shape.len();
        for (i, &d) in shape.iter().enumerate() {
            let o = &mut out[offset + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(crate::invalid!("shapes {shapes:?} cannot be broadcast together"));
            }
        }
    }
    Ok(out)
}

/// Resolves a possibly negative axis against a rank.
pub fn normalize_axis(axis: i64, rank: usize) -> Result<usize, IrError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(crate::invalid!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        let cases: &[(&[&[usize]], Option<&[usize]>)] = &[
            (&[&[2, 3], &[3]], Some(&[2, 3])),
            (&[&[2, 1, 4], &[3, 1]], Some(&[2, 3, 4])),
            (&[&[], &[5]], Some(&[5])),
            (&[&[2, 3], &[4]], None),
        ];
        for (shapes, expected) in cases {
            let got = broadcast_shapes(shapes).ok();
            assert_eq!(got.as_deref(), *expected, "{shapes:?}");
        }
    }

    #[test]
    fn negative_axes_count_from_the_end() {
        assert_eq!(normalize_axis(-1, 3).unwrap(), 2);
        assert_eq!(normalize_axis(0, 0).unwrap(), 0);
        assert!(normalize_axis(3, 3).is_err());
        assert!(normalize_axis(-4, 3).is_err());
    }
}
