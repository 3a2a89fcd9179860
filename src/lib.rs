//! gentoo-mkimg: Gentoo stage3 + Portage snapshot → container images, without a daemon.
//!
//! The modules follow the pipeline: [`inputs`] fetches and verifies stages and snapshots,
//! [`archive`] reads them, [`engine`] runs sessions in a stage, [`build`] is the job,
//! [`image`] makes layers, configs and manifests in the [`image::store`], [`publish`] gets
//! images out of the store. [`import`] and [`images`] are the commands built on them; [`cli`]
//! only parses arguments. [`audit`] checks that everything in an image can load
//! (interpreters, libraries, `#!`); [`sbom`] writes an image's SPDX SBOM from its package
//! database.
//!
//! # Layers
//!
//! Data flows one way: a module uses only modules of lower layers than its own, never one of
//! its own layer or above (`tests/layering.rs` reads this table and checks every `crate::`
//! path under src/).
//!
//! | layer | modules | what they are |
//! |---|---|---|
//! | 0 | `progress`, `net` | the terminal's progress and sizes; HTTP and Docker Engine API connections |
//! | 1 | `archive` | reading tarballs and squashfs safely, decompression, digests, extraction |
//! | 2 | `image`, `portage` | layers, configs, manifests and the OCI store; Portage's package data |
//! | 3 | `audit`, `images`, `import`, `inputs`, `publish`, `snapshot` | steps on images and inputs |
//! | 4 | `engine`, `inspect` | sessions in a stage (sandbox, Docker); what an image holds |
//! | 5 | `sbom` | an image's SPDX SBOM |
//! | 6 | `config` | the build's settings, from flags and the config file |
//! | 7 | `build` | the build job |
//! | 8 | `shell` | a session in a stage, by hand |
//! | 9 | `cli` | the command line |

pub mod archive;
pub mod audit;
pub mod build;
pub mod cli;
pub mod config;
pub mod engine;
pub mod image;
pub mod images;
pub mod import;
pub mod inputs;
pub mod inspect;
pub mod net;
pub mod portage;
pub mod progress;
pub mod publish;
pub mod sbom;
pub mod shell;
pub mod snapshot;
