/**
 * The extension's icon: a shield with a keyhole, for the enclave (toolbar button, sidebar tab, commands).
 */

import { LabIcon } from '@jupyterlab/ui-components';

import enclaveSvg from '../style/icons/enclave.svg';

export const enclaveIcon = new LabIcon({ name: 'dcr:enclave', svgstr: enclaveSvg });
