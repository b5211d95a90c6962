//! Evaluation. For the toy world: attribute classifiers trained on ground-truth renders
//! (never used by the method) that score subject fidelity and prompt fidelity exactly.
pub mod classifier;
pub mod experiment;
pub mod fidelity;
pub mod metrics;
pub mod report;
pub mod toy;
