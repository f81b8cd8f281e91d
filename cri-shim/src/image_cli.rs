//! `wasmlet image …`: the image commands. `push` talks to the registry;
//! `pull`, `ls` and `rm` drive the agent's CRI ImageService on the socket,
//! the same code the kubelet's calls run.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use wasmlet_agent::{Credentials, Registry};
use wasmlet_proto::cri;
use wasmlet_proto::cri::image_service_client::ImageServiceClient;

use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct RegistryLogin {
    /// Registry user name.
    #[arg(long)]
    username: Option<String>,
    /// Read the password from standard input.
    #[arg(long, requires = "username")]
    password_stdin: bool,
}

impl RegistryLogin {
    /// The login as CRI's AuthConfig, if one was given.
    pub fn auth_config(&self) -> anyhow::Result<Option<cri::AuthConfig>> {
        let credentials = self.credentials()?;
        Ok((!credentials.username.is_empty()).then(|| cri::AuthConfig {
            username: credentials.username,
            password: credentials.password,
            ..Default::default()
        }))
    }

    fn credentials(&self) -> anyhow::Result<Credentials> {
        let Some(username) = &self.username else {
            return Ok(Credentials::default());
        };
        let mut password = String::new();
        if self.password_stdin {
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from standard input")?;
        }
        Ok(Credentials {
            username: username.clone(),
            password: password.trim_end_matches(['\n', '\r']).to_owned(),
            ..Default::default()
        })
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Package a Wasm module or component as an OCI Wasm artifact in the
    /// store: through the running agent on the socket (validated and
    /// compiled before it answers, as a pull is), or, with no agent
    /// listening, straight into the root's store.
    Import {
        /// The `.wasm` file.
        file: PathBuf,
        /// The image reference to give it, e.g. `example.com/app:v1`.
        name: String,
    },
    /// Push a Wasm module or component to a registry as an OCI Wasm artifact.
    Push {
        file: PathBuf,
        /// `REGISTRY/REPOSITORY:TAG`.
        reference: String,
        #[command(flatten)]
        login: RegistryLogin,
        /// Speak plain HTTP to the registry.
        #[arg(long)]
        insecure: bool,
    },
    /// Pull an image through the agent (CRI PullImage).
    Pull {
        reference: String,
        #[command(flatten)]
        login: RegistryLogin,
    },
    /// List the agent's images (CRI ListImages).
    Ls,
    /// Remove an image by tag, digest or id (CRI RemoveImage).
    Rm { reference: String },
}

async fn images(
    settings: &Settings,
) -> anyhow::Result<ImageServiceClient<tonic::transport::Channel>> {
    let channel = wasmlet_proto::connect_unix(&settings.socket)
        .await
        .with_context(|| format!("connecting to the agent on {:?}", settings.socket))?;
    Ok(ImageServiceClient::new(channel))
}

fn spec(reference: String) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: reference,
        ..Default::default()
    })
}

pub async fn run(settings: Settings, command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Import { file, name } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {file:?}"))?;
            match wasmlet_proto::connect_unix(&settings.socket).await {
                Ok(channel) => {
                    let id = import_through_agent(channel, bytes, &name)
                        .await
                        .with_context(|| {
                            format!(
                                "importing {file:?} as {name} into the agent on {:?}",
                                settings.socket
                            )
                        })?;
                    println!("{id}");
                }
                Err(_) => {
                    let agent = crate::server::open_agent(&settings)?;
                    let image = agent
                        .import_image(&file, &name)
                        .with_context(|| format!("importing {file:?} as {name}"))?;
                    println!("{}", image.id);
                }
            }
        }
        ImageCommand::Push {
            file,
            reference,
            login,
            insecure,
        } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {file:?}"))?;
            let mut config = settings.registry.clone();
            if insecure {
                let name = wasmlet_agent::model::image::ImageName::parse(&reference)?;
                let host = name
                    .repository
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                config.insecure.push(host);
            }
            let registry = Registry::new(config)?;
            let digest = registry
                .push_wasm(&bytes, &reference, &login.credentials()?)
                .await
                .with_context(|| format!("pushing {file:?} to {reference}"))?;
            println!("{digest}");
        }
        ImageCommand::Pull { reference, login } => {
            let auth = login.auth_config()?;
            let reply = images(&settings)
                .await?
                .pull_image(cri::PullImageRequest {
                    image: spec(reference.clone()),
                    auth,
                    sandbox_config: None,
                })
                .await
                .map_err(|s| {
                    anyhow::anyhow!("pulling {reference}: {:?}: {}", s.code(), s.message())
                })?;
            println!("{}", reply.into_inner().image_ref);
        }
        ImageCommand::Ls => {
            let list = images(&settings)
                .await?
                .list_images(cri::ListImagesRequest { filter: None })
                .await
                .map_err(|s| anyhow::anyhow!("listing images: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            println!("{:<60} {:<20} {:>10}", "REFERENCE", "IMAGE ID", "SIZE");
            for image in list.images {
                let short = image
                    .id
                    .trim_start_matches("sha256:")
                    .chars()
                    .take(12)
                    .collect::<String>();
                let names = if image.repo_tags.is_empty() {
                    image.repo_digests.clone()
                } else {
                    image.repo_tags.clone()
                };
                for name in names {
                    println!("{name:<60} {short:<20} {:>10}", image.size);
                }
            }
        }
        ImageCommand::Rm { reference } => {
            let mut client = images(&settings).await?;
            let found = client
                .image_status(cri::ImageStatusRequest {
                    image: spec(reference.clone()),
                    verbose: false,
                })
                .await
                .map_err(|s| {
                    anyhow::anyhow!("looking up {reference}: {:?}: {}", s.code(), s.message())
                })?
                .into_inner()
                .image;
            if found.is_none() {
                bail!("no image {reference}");
            }
            client
                .remove_image(cri::RemoveImageRequest {
                    image: spec(reference.clone()),
                })
                .await
                .map_err(|s| {
                    anyhow::anyhow!("removing {reference}: {:?}: {}", s.code(), s.message())
                })?;
            println!("removed {reference}");
        }
    }
    Ok(())
}

/// The bytes of one ImportImage message.
const IMPORT_CHUNK: usize = 1 << 20;

/// Streams `bytes` to the agent's admin API as the image `name`; its id.
async fn import_through_agent(
    channel: tonic::transport::Channel,
    bytes: Vec<u8>,
    name: &str,
) -> anyhow::Result<String> {
    use wasmlet_proto::admin;
    let mut messages: Vec<admin::ImportImageRequest> = bytes
        .chunks(IMPORT_CHUNK)
        .map(|chunk| admin::ImportImageRequest {
            reference: String::new(),
            data: chunk.to_vec(),
        })
        .collect();
    if messages.is_empty() {
        messages.push(admin::ImportImageRequest::default());
    }
    messages[0].reference = name.to_owned();
    let mut client = admin::admin_client::AdminClient::new(channel);
    let answer = client
        .import_image(futures::stream::iter(messages))
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner();
    Ok(answer.image_id)
}
