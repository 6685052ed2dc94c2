//! `microvm commit [-c INSTRUCTION]... [-m MSG] [-a AUTHOR] [--pause=true] CONTAINER IMAGE[:TAG]`:
//! a container's changes as a new image, stored like any loaded one.

use clap::Args;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::container;
use crate::image::{parse_change, CommitOptions};

/// Flags of `microvm commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Apply a Dockerfile instruction to the image's config (CMD, ENTRYPOINT, ENV, EXPOSE,
    /// LABEL, STOPSIGNAL, USER, WORKDIR).
    #[arg(short, long = "change", value_name = "INSTRUCTION")]
    pub change: Vec<String>,
    /// Commit message (the history entry's comment).
    #[arg(short, long, value_name = "MSG")]
    pub message: Option<String>,
    /// Author.
    #[arg(short, long, value_name = "AUTHOR")]
    pub author: Option<String>,
    /// Stop the container's processes while its changes are read.
    #[arg(short, long, default_value_t = true, action = clap::ArgAction::Set)]
    pub pause: bool,
    /// The container (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER")]
    pub container: String,
    /// Name of the new image.
    #[arg(value_name = "IMAGE[:TAG]")]
    pub image: String,
}

/// Runs `microvm commit`: prints the new image's ID.
pub fn commit(args: CommitArgs) -> i32 {
    let changes = match args
        .change
        .iter()
        .map(|c| parse_change(c))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let c = match container::containers().and_then(|s| s.resolve(&args.container)) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let opts = CommitOptions {
        changes,
        message: args.message,
        author: args.author,
        created_by: format!("microvm commit {}", c.config.short_id()),
    };
    match container::commit::commit(&c, &args.image, &opts, args.pause) {
        Ok(image) => {
            println!("{}", image.config_digest);
            0
        }
        Err(e) => fail(e),
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    error_line(msg);
    EXIT_MICROVM_ERROR
}
