//! The Dockerfile frontend, pure (no I/O): text → lines and directives → instruction nodes
//! (`parser`) → typed instructions and stages (`instructions`); Docker's word processing
//! and variable expansion (`lex`); `.dockerignore` matching (`ignore`). BuildKit's
//! `frontend/dockerfile` is the reference for every rule here.

pub mod ignore;
pub mod instructions;
pub mod lex;
pub mod mounts;
pub mod parser;
