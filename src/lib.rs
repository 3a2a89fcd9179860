//! gentoo-mkimg: Gentoo stage3 + Portage snapshot → container images, without a daemon.
//!
//! The modules follow the pipeline: [`inputs`] fetches and verifies stages and snapshots,
//! [`archive`] reads them, [`engine`] runs sessions in a stage, [`build`] is the job,
//! [`image`] makes layers,
//! configs and manifests in the [`image::store`], [`publish`] gets images out of the store.
//! [`import`] and [`images`] are the commands built on them; [`cli`] only parses arguments.
//! [`audit`] checks that everything in an image can load (interpreters, libraries, `#!`);
//! [`sbom`] writes an image's SPDX SBOM from its package database.

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
