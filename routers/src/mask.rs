use std::fmt;

/// Errors building an expert mask.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaskError {
    #[error("expert index {index} is out of range: the model has {num_experts} experts (0..{num_experts})")]
    OutOfRange { index: usize, num_experts: usize },
    #[error("every expert would be opted out; at least one expert must remain")]
    Empty,
}

/// The set of experts a model may use, by index.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ExpertMask {
    allowed: Vec<bool>,
}

impl ExpertMask {
    /// All `num_experts` experts allowed.
    pub fn all(num_experts: usize) -> Self {
        Self {
            allowed: vec![true; num_experts],
        }
    }

    /// This mask with the given expert indices removed. Errors on an unknown index or when no expert remains.
    pub fn without(&self, removed: &[usize]) -> Result<Self, MaskError> {
        let mut allowed = self.allowed.clone();
        for &index in removed {
            let slot = allowed.get_mut(index).ok_or(MaskError::OutOfRange {
                index,
                num_experts: self.allowed.len(),
            })?;
            *slot = false;
        }
        if !allowed.iter().any(|&a| a) {
            return Err(MaskError::Empty);
        }
        Ok(Self { allowed })
    }

    /// Number of experts the mask is defined over (allowed or not).
    pub fn num_experts(&self) -> usize {
        self.allowed.len()
    }

    pub fn is_allowed(&self, expert: usize) -> bool {
        self.allowed.get(expert).copied().unwrap_or(false)
    }

    /// Number of allowed experts.
    pub fn count(&self) -> usize {
        self.allowed.iter().filter(|&&a| a).count()
    }

    /// Indices of the allowed experts, ascending.
    pub fn allowed(&self) -> impl Iterator<Item = usize> + '_ {
        self.allowed
            .iter()
            .enumerate()
            .filter_map(|(i, &a)| a.then_some(i))
    }

    /// Indices of the experts opted out, ascending.
    pub fn removed(&self) -> impl Iterator<Item = usize> + '_ {
        self.allowed
            .iter()
            .enumerate()
            .filter_map(|(i, &a)| (!a).then_some(i))
    }

    /// True when every allowed expert of `self` is also allowed by `other`.
    pub fn is_subset_of(&self, other: &ExpertMask) -> bool {
        self.allowed().all(|e| other.is_allowed(e))
    }
}

impl fmt::Debug for ExpertMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExpertMask{:?}", self.allowed().collect::<Vec<_>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_removes_and_validates() {
        let m = ExpertMask::all(3).without(&[1]).unwrap();
        assert_eq!(m.allowed().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(m.removed().collect::<Vec<_>>(), vec![1]);
        assert_eq!(m.count(), 2);
        assert_eq!(
            ExpertMask::all(3).without(&[3]),
            Err(MaskError::OutOfRange {
                index: 3,
                num_experts: 3
            })
        );
        assert_eq!(ExpertMask::all(2).without(&[0, 1]), Err(MaskError::Empty));
        assert!(m.is_subset_of(&ExpertMask::all(3)));
        assert!(!ExpertMask::all(3).is_subset_of(&m));
    }
}
