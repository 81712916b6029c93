//! One file per command. Each builds its request, calls the daemon, and prints.

pub mod build;
pub mod builder;
pub mod images;
pub mod import;
pub mod info;
pub mod load;
pub mod login;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod rm;
pub mod save;
pub mod tag;
pub mod version;

use crate::{Cli, Command, CtrImg};
use anyhow::{Context, Result};
use isula_api::v1::control_client::ControlClient;
use tonic::transport::Channel;

pub type Client = ControlClient<Channel>;

pub async fn connect(host: &str) -> Result<Client> {
    let socket = isula_api::socket_path_from_host(host).map_err(anyhow::Error::msg)?;
    isula_api::connect(&socket).await.with_context(|| {
        format!("cannot connect to the isula-builder at {host}: is the isula-builder running?")
    })
}

/// A random operation ID, as the API's *ID fields expect.
pub fn op_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::CtrImg(c) => {
            let mut client = connect(&cli.host).await?;
            match c {
                CtrImg::Build(a) => build::run(&mut client, *a).await,
                CtrImg::Images(a) => images::run(&mut client, a).await,
                CtrImg::Import(a) => import::run(&mut client, a).await,
                CtrImg::Load(a) => load::run(&mut client, a).await,
                CtrImg::Pull(a) => pull::run(&mut client, a).await,
                CtrImg::Push(a) => push::run(&mut client, a).await,
                CtrImg::Rm(a) => rm::run(&mut client, a).await,
                CtrImg::Save(a) => save::run(&mut client, a).await,
                CtrImg::Tag(a) => tag::run(&mut client, a).await,
            }
        }
        Command::Builder(b) => builder::run(&mut connect(&cli.host).await?, b).await,
        Command::Info(a) => info::run(&mut connect(&cli.host).await?, a).await,
        Command::Login(a) => login::login(&mut connect(&cli.host).await?, a).await,
        Command::Logout(a) => login::logout(&mut connect(&cli.host).await?, a).await,
        Command::Manifest(m) => manifest::run(&mut connect(&cli.host).await?, m).await,
        Command::Version => version::run(&cli.host).await,
        Command::Completion { .. } => Ok(()),
    }
}
